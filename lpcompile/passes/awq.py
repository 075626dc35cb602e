"""awq: activation-aware weight quantization for weight-only low-bit formats (Lin et al., "AWQ",
2023), in two parts that run with GPTQ, not instead of it.

1. `AwqScale` (a pass, before calibration): a few input channels carry most of the activation
   energy, and rounding error on their weight rows costs the most at the output. Scaling row j of
   the weight up by s_j = mean|X_j|^α (normalised so max·min = 1) and channel j of the input down
   by 1/s_j puts those rows on a finer part of the grid. The 1/s is folded exactly as
   SmoothQuant's is (`lpcompile.passes.smooth`: into the producer norm, linear layer or attention
   chain; other sites skipped with the reason), and α is searched per site (no scaling, α = 0.1 ...
   0.9) by the consumers' output error ‖X·W − (X/s)·Q(s·W)‖² with the weights rounded to the
   recipe's spec, measured on calibration rows. GPTQ then quantizes the scaled weights.

2. `output_error_scales` (the weight method "gptq-clip"): the clipping ratio of each scale group
   chosen by the group's output error, Δwᵀ H_g Δw with H_g the group's block of H = XᵀX (the
   calibration Hessian GPTQ already has), instead of its squared weight error weighted by diag(H)
   only: the error of a group reaching the output through correlated inputs is what counts.
   GPTQ then quantizes with these scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lpcompile.formats import MIN_SCALE, PerBlock, PerChannel, QuantSpec
from lpcompile.passes.smooth import ALPHAS, Smooth

REPORT_KEY = "lpcompile.awq"
CLIP_RATIOS = np.linspace(1.0, 0.5, 26)


@dataclass(frozen=True)
class AwqScale(Smooth):
    """Activation-aware scaling of weight-only layers (module docstring, part 1). Fields as in
    `Smooth`; `activations` is None (float inputs), `weights` the spec the search rounds to."""

    alphas: tuple[float, ...] = ALPHAS
    report_key = REPORT_KEY

    @property
    def clip_search(self) -> bool:
        return False  # AWQ searches the scale with plain rounding; clipping is searched afterwards

    def scales(self, rows, x_absmax, w_absmax, alpha, block):
        return awq_scales(np.abs(rows).mean(axis=0), alpha, block)


def awq_scales(mean_abs: np.ndarray, alpha: float, block: int | None = None) -> np.ndarray:
    """s_j = mean|X_j|^α normalised so that max(s)·min(s) = 1; with `block` < the channel count,
    one s per position within a block (the mean over the blocks)."""
    m = np.maximum(np.asarray(mean_abs, np.float64), 1e-8)
    c = len(m)
    if block is not None and block < c:
        m = np.tile(m.reshape(-1, block).mean(axis=0), c // block)
    s = m ** alpha
    s = s / np.sqrt(s.max() * s.min())
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def output_error_scales(w: np.ndarray, spec: QuantSpec, gram: np.ndarray,
                        ratios: np.ndarray = CLIP_RATIOS) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-group scales (and zero points for asymmetric ints), in `weight_quant.group_shape`
    layout, each group's clipping ratio minimising its output error Δwᵀ H_g Δw on canonical
    [K, N] weights with H = XᵀX [K, K]. Groups must lie along K (blocks on axis 0, per output
    channel); for a group spanning all of K (per channel) H_g is all of H."""
    w = np.asarray(w, np.float64)
    k, n = w.shape
    g = spec.granularity
    if isinstance(g, PerBlock) and g.axis == 0:
        size = g.size
    elif isinstance(g, PerChannel) and g.axis == 1:
        size = k
    else:
        raise ValueError(f"output-error clipping needs groups along the input axis, got {spec}")
    h = np.asarray(gram, np.float64)
    fmt = spec.format
    nb = -(-k // size)
    scales = np.zeros((nb, n))
    zeros = None if spec.symmetric else np.zeros((nb, n))
    for b in range(nb):
        rows = slice(b * size, min(k, (b + 1) * size))
        wb, hb = w[rows], h[rows, rows]
        best_err = np.full(n, np.inf)
        if spec.symmetric:
            absmax = np.abs(wb).max(axis=0)
        else:
            lo, hi = np.minimum(wb.min(axis=0), 0.0), np.maximum(wb.max(axis=0), 0.0)
        for r in ratios:
            if spec.symmetric:
                s = _safe(absmax * r / fmt.max_finite)
                deq = fmt.quantize(wb / s) * s
                z = None
            else:
                s = _safe((hi - lo) * r / (fmt.qmax - fmt.qmin))
                z = np.clip(np.rint(fmt.qmin - lo * r / s), fmt.qmin, fmt.qmax)
                deq = (np.clip(np.rint(wb / s) + z, fmt.qmin, fmt.qmax) - z) * s
            d = deq - wb
            err = np.einsum("in,in->n", hb @ d, d)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            scales[b] = np.where(better, s, scales[b])
            if z is not None:
                zeros[b] = np.where(better, z, zeros[b])
    if isinstance(g, PerChannel):
        return scales[0].astype(np.float32), (None if zeros is None else zeros[0].astype(np.float32))
    return scales.astype(np.float32), (None if zeros is None else zeros.astype(np.float32))


def _safe(scale: np.ndarray) -> np.ndarray:
    return np.where(scale > 0, scale, np.float32(MIN_SCALE))
