"""Weight quantization numerics on the canonical [K (in), N (out)] layout.

- `rtn`: round-to-nearest with absmax scales.
- `mse`: round-to-nearest with the clipping ratio per scale group that minimises the squared
  weight error (grid search; outliers in a group otherwise waste most of the grid).
- `gptq`: error-compensating: rows (input features) are quantized one after another and each
  row's error is pushed onto the rows not yet quantized, weighted by the inverse Hessian of the
  layer's inputs H = XᵀX from calibration (Frantar et al., "GPTQ", 2022). Group scales are found
  (with MSE clipping) when the solver enters a group, on the weights as updated so far.

Every method returns `QuantizedWeight`: the values in code units (exactly representable in the
format), the scales, and the zero point, all in the canonical layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lpcompile.errors import FormatError
from lpcompile.formats import MIN_SCALE, FloatFormat, IntFormat, PerBlock, PerChannel, PerTensor, QuantSpec

_CLIP_RATIOS = np.linspace(1.0, 0.5, 26)
_SEARCH_ELEMENTS = 1 << 20  # weights per slice of the clipping search (find_scales)


@dataclass(frozen=True)
class QuantizedWeight:
    codes: np.ndarray  # [K, N] float32, values of the format (integers for int formats)
    scale: np.ndarray  # () per-tensor, [N] or [K] per-channel, [ceil(K/B), N] or [K, ceil(N/B)] per-block
    zero_point: np.ndarray | None  # same shape as scale (asymmetric ints), else None
    spec: QuantSpec

    def dequantize(self) -> np.ndarray:
        return (self.codes - self._broadcast(self.zero_point, 0.0)) * self._broadcast(self.scale, 1.0)

    def _broadcast(self, a: np.ndarray | None, default: float) -> np.ndarray | float:
        if a is None:
            return default
        return expand_groups(a, self.spec, self.codes.shape)


def group_shape(spec: QuantSpec, shape: tuple[int, int]) -> tuple[int, ...]:
    g = spec.granularity
    k, n = shape
    if isinstance(g, PerTensor):
        return ()
    if isinstance(g, PerChannel):
        return (shape[g.axis],)
    if isinstance(g, PerBlock):
        return (-(-k // g.size), n) if g.axis == 0 else (k, -(-n // g.size))
    raise TypeError(f"unsupported granularity {g}")


def expand_groups(a: np.ndarray, spec: QuantSpec, shape: tuple[int, int]) -> np.ndarray:
    """Broadcast per-group values `a` to the full [K, N] weight shape."""
    g = spec.granularity
    if isinstance(g, PerTensor):
        return np.broadcast_to(a, shape)
    if isinstance(g, PerChannel):
        return np.broadcast_to(a[None, :] if g.axis == 1 else a[:, None], shape)
    rep = np.repeat(a, g.size, axis=g.axis)
    return rep[: shape[0], : shape[1]]


def _grouped(w: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """w viewed as [groups..., members] (padding a ragged last block with zeros)."""
    g = spec.granularity
    if isinstance(g, PerTensor):
        return w.reshape(1, -1)
    if isinstance(g, PerChannel):
        return w.T if g.axis == 1 else w
    k, n = w.shape
    if g.axis == 0:
        nb = -(-k // g.size)
        padded = np.zeros((nb * g.size, n), w.dtype)
        padded[:k] = w
        return padded.reshape(nb, g.size, n).transpose(0, 2, 1).reshape(nb * n, g.size)
    nb = -(-n // g.size)
    padded = np.zeros((k, nb * g.size), w.dtype)
    padded[:, :n] = w
    return padded.reshape(k * nb, g.size)


def _ungroup_params(p: np.ndarray, spec: QuantSpec, shape: tuple[int, int]) -> np.ndarray:
    return p.reshape(group_shape(spec, shape)) if group_shape(spec, shape) else p.reshape(())


def find_scales(
    w: np.ndarray, spec: QuantSpec, clip_search: bool, importance: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales (and zero points for asymmetric ints) per group, in `group_shape` layout.

    `importance` [K] weighs each input feature's squared error in the clipping search (the
    diagonal of XᵀX: an error on a loud input channel costs more at the layer output)."""
    all_rows = _grouped(w, spec)
    all_imp = 1.0 if importance is None else _grouped(np.broadcast_to(importance[:, None], w.shape), spec)
    fmt = spec.format
    ratios = _CLIP_RATIOS if clip_search else np.ones(1)
    # Groups are independent, so the search runs on slices of them: its temporaries (a few
    # float64 copies per ratio) are those of a slice, not of the layer (a 32000x4096 embedding
    # held ~8x its fp32 size in them); every group's result is the same.
    step = max(1, _SEARCH_ELEMENTS // max(all_rows.shape[1], 1))
    scales, zeros = [], []
    for start in range(0, len(all_rows), step):
        rows = all_rows[start : start + step]
        imp = all_imp if np.isscalar(all_imp) else all_imp[start : start + step]
        if spec.symmetric:
            absmax = np.abs(rows).max(axis=1)
            best_scale = _safe(absmax / fmt.max_finite)
            if clip_search:
                best_err = np.full(len(rows), np.inf)
                for r in ratios:
                    s = _safe(absmax * r / fmt.max_finite)
                    err = (imp * (fmt.quantize(rows / s[:, None]) * s[:, None] - rows) ** 2).sum(axis=1)
                    better = err < best_err
                    best_scale = np.where(better, s, best_scale)
                    best_err = np.where(better, err, best_err)
            scales.append(best_scale.astype(np.float32))
            continue
        lo = np.minimum(rows.min(axis=1), 0.0)
        hi = np.maximum(rows.max(axis=1), 0.0)
        best_err = np.full(len(rows), np.inf)
        best_s = np.ones(len(rows))
        best_z = np.zeros(len(rows))
        for r in ratios:
            s = _safe((hi - lo) * r / (fmt.qmax - fmt.qmin))
            z = np.clip(np.rint(fmt.qmin - lo * r / s), fmt.qmin, fmt.qmax)
            q = np.clip(np.rint(rows / s[:, None]) + z[:, None], fmt.qmin, fmt.qmax)
            err = (imp * ((q - z[:, None]) * s[:, None] - rows) ** 2).sum(axis=1)
            better = err < best_err
            best_s, best_z, best_err = np.where(better, s, best_s), np.where(better, z, best_z), np.where(better, err, best_err)
        scales.append(best_s.astype(np.float32))
        zeros.append(best_z.astype(np.float32))
    shape = w.shape
    scale = _ungroup_params(np.concatenate(scales), spec, shape)
    return scale, (_ungroup_params(np.concatenate(zeros), spec, shape) if zeros else None)


def _safe(scale: np.ndarray) -> np.ndarray:
    """All-zero groups get a tiny positive scale, so they dequantize to exactly 0."""
    return np.where(scale > 0, scale, np.float32(MIN_SCALE))


def _to_codes(w: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, fmt: IntFormat | FloatFormat) -> np.ndarray:
    if zp is None:
        return fmt.quantize(w / scale).astype(np.float32)
    return np.clip(np.rint(w / scale) + zp, fmt.qmin, fmt.qmax).astype(np.float32)


def quantize_rtn(w: np.ndarray, spec: QuantSpec, clip_search: bool = True) -> QuantizedWeight:
    w = np.asarray(w, np.float32)
    scale, zp = find_scales(w, spec, clip_search)
    full_s = expand_groups(scale, spec, w.shape)
    full_z = expand_groups(zp, spec, w.shape) if zp is not None else None
    return QuantizedWeight(_to_codes(w, full_s, full_z, spec.format), scale, zp, spec)


def quantize_gptq(
    w: np.ndarray, spec: QuantSpec, gram: np.ndarray, damp: float = 0.01, block: int = 128, act_order: bool = True,
    clip: str = "weight",
) -> QuantizedWeight:
    """GPTQ on canonical [K, N] weights with H = XᵀX [K, K] of the layer's inputs.

    Scales are found first on the original weights (MSE clipping per group), then rows are
    quantized in order of decreasing H diagonal (`act_order`: the inputs with the most energy
    first, while the most freedom is left to compensate) and each row's error is spread over the
    rows still to come. Groups must lie along K (per-block on axis 0), or be per output channel.
    """
    w = np.array(w, np.float64)
    k, n = w.shape
    g = spec.granularity
    if isinstance(g, PerBlock) and g.axis != 0 or isinstance(g, PerChannel) and g.axis != 1:
        raise ValueError(f"GPTQ needs groups along the input axis, got {spec}")
    if clip == "output":  # each group's clipping by its output error ΔwᵀH_gΔw (lpcompile.passes.awq)
        from lpcompile.passes.awq import output_error_scales

        scale, zp = output_error_scales(w, spec, gram)
    else:
        scale, zp = find_scales(w.astype(np.float32), spec, clip_search=True, importance=np.diag(gram).copy())
    full_s = np.array(expand_groups(scale, spec, (k, n)), np.float64)
    full_z = None if zp is None else np.array(expand_groups(zp, spec, (k, n)), np.float64)
    h = np.array(gram, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    w, h, full_s = w[perm], h[perm][:, perm], full_s[perm]
    full_z = full_z[perm] if full_z is not None else None
    u = _inverse_cholesky_upper(h)
    codes = np.zeros((k, n), np.float32)
    fmt = spec.format
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = w[b0:b1].copy()
        err = np.zeros_like(wb)
        for i in range(b1 - b0):
            row = b0 + i
            z = full_z[row] if full_z is not None else None
            q = _to_codes(wb[i], full_s[row], z, fmt)
            codes[row] = q
            deq = (q - (z if z is not None else 0.0)) * full_s[row]
            err[i] = (wb[i] - deq) / u[row, row]
            wb[i + 1 :] -= np.outer(u[row, row + 1 : b1], err[i])
        w[b1:] -= u[b0:b1, b1:].T @ err
    codes = codes[np.argsort(perm)]
    return QuantizedWeight(codes, scale, zp, spec)


def _inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """Upper-triangular U with Uᵀ U = H⁻¹ (adding damping until H is positive definite)."""
    k = h.shape[0]
    extra = 0.0
    for _ in range(8):
        try:
            lower = np.linalg.cholesky(h + extra * np.eye(k))
            break
        except np.linalg.LinAlgError:
            extra = max(extra * 10, 1e-6 * float(np.mean(np.diag(h))))
    else:
        raise np.linalg.LinAlgError("Hessian is not positive definite even with damping")
    inv_lower = np.linalg.solve(lower, np.eye(k))  # L⁻¹
    hinv = inv_lower.T @ inv_lower  # H⁻¹ = L⁻ᵀ L⁻¹
    return np.linalg.cholesky(hinv).T


def quantize_weight(
    w: np.ndarray, spec: QuantSpec, method: str = "mse", gram: np.ndarray | None = None
) -> QuantizedWeight:
    """Quantize canonical [K, N] weights by `method` in {"rtn", "mse", "gptq"}.

    "gptq" without a Hessian, or with a granularity it cannot use (`gptq_applies`), falls back to
    "mse" (`lpcompile.passes.quantize.effective_method` says which ran, for the report).
    """
    if method not in ("rtn", "mse", "gptq", "gptq-clip"):
        raise FormatError(f"unknown weight method {method!r}; choose one of: rtn, mse, gptq, gptq-clip")
    if method in ("gptq", "gptq-clip") and gram is not None and gptq_applies(spec):
        return quantize_gptq(w, spec, gram, clip="output" if method == "gptq-clip" else "weight")
    if method == "rtn":
        return quantize_rtn(w, spec, clip_search=False)
    return quantize_rtn(w, spec, clip_search=True)


def gptq_applies(spec: QuantSpec) -> bool:
    """GPTQ quantizes input rows one at a time, spreading each row's error over the rows left: it
    needs groups that lie along the input axis (per tensor, per output channel, blocks along K)."""
    g = spec.granularity
    return not (isinstance(g, PerBlock) and g.axis != 0 or isinstance(g, PerChannel) and g.axis != 1)
