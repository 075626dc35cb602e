"""smooth: SmoothQuant-style scale migration from activations to weights.

A linear input X with a few loud channels wastes a per-tensor (or per-token) activation grid on
them. With a positive per-channel scale s, X·W = (X·diag(1/s))·(diag(s)·W): dividing channel j of
the activation by s_j and multiplying row j of every consumer's weight by it changes nothing in
float, and moves the outliers from the activation, where the grid is shared, to the weights,
where every output channel (or block) has its own scale (Xiao et al., "SmoothQuant", 2022):

    s_j = max|X_j|^α / max|W_j|^(1-α)     (max|W_j| over the row j of all consumers' weights)

The 1/s is folded into whatever produces X, so the graph gains no work:
- a LayerNormalization / RMSNormalization with constant scale (and bias): γ ← γ/s, β ← β/s;
- a linear layer (MatMul [+ Add bias] / Gemm) whose output is X: its output columns and bias / s;
- a linear layer reaching X only through data movement and maps along other axes (the V → O
  chain of attention, `lpcompile.ir.invariance.find_chains`): its output columns / s, with s
  tiled per block where the chain reshapes the channel axis (the graph proves only that blocks
  travel whole, so channel j of a block must share its scale with channel j of every block).
Readers of X other than the linear layers (a post-LN transformer's residual Add) get X back
through one inserted `Mul(X/s, s)`. Anything else (a Gelu, an online Hadamard, a graph input) is
skipped with the reason.

α is chosen per site from calibration data: for each candidate (no smoothing, α = 0.1 ... 0.9)
the consumers' outputs are computed in numpy with the activation quantized as `activations`
says and the weights rounded as `weights` says (MSE-clipped rounding, as a stand-in for GPTQ),
and the α with the smallest summed relative output error is kept; a site where no smoothing
measures best is left alone. Preserves: semantics up to float rounding.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from lpcompile.errors import PassError
from lpcompile.formats import QuantSpec
from lpcompile.ir.invariance import find_chains
from lpcompile.ir.patterns import LinearLayer, find_linear_layers, match_linear
from lpcompile.ir.run import OrtRunner
from lpcompile.ir.store import new_tensor, read_weight
from lpcompile.passes.calibrate import TensorStats
from lpcompile.passes.weight_quant import quantize_rtn

log = logging.getLogger(__name__)

REPORT_KEY = "lpcompile.smooth"  # model.meta: what the pass did per site
ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_MIN_S = 1e-5


@dataclass
class Site:
    """One smoothable linear input: the value, the layers reading it, and where 1/s can go."""

    value: ir.Value
    consumers: list[LinearLayer]
    target: str  # "norm" | "linear" | "chain"
    producer: ir.Node | LinearLayer
    block: int  # s is tiled with this period (the channel count: not tiled)
    others: list[ir.Usage] = field(default_factory=list)  # non-linear readers, given X back by a Mul


@dataclass(frozen=True)
class Smooth(ir.passes.InPlacePass):
    """Migrate activation outliers into the weights (module docstring).

    data: calibration batches (a `CalibrationData`) the statistics and the α search run on.
    activations / weights: the specs the search measures the error for (the recipe's).
    alpha: a fixed α for every site (None: searched per site among `alphas`, "off" included).
    max_rows: rows of each input kept (evenly spaced) for the error measurement."""

    data: object
    activations: QuantSpec | None
    weights: QuantSpec | None
    alpha: float | None = None
    alphas: tuple[float, ...] = ALPHAS
    batch_size: int = 8
    max_rows: int = 1024
    stats: Counter = field(default_factory=Counter, compare=False)

    report_key = REPORT_KEY  # model.meta key of the report (a subclass with another rule has its own)

    @property
    def clip_search(self) -> bool:
        """Whether the search rounds weights with MSE clipping (matters at 4 bits, little at 8)."""
        return self.weights is not None and self.weights.format.bits <= 4

    def scales(self, rows: np.ndarray, x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float,
               block: int) -> np.ndarray:
        """The per-channel s for `alpha` (SmoothQuant's rule; a subclass may use another)."""
        return smoothing_scales(x_absmax, w_absmax, alpha, block)

    def __post_init__(self):
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise PassError(f"Smooth: alpha must lie in [0, 1], got {self.alpha}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        sites, report = find_sites(model.graph)
        samples = _collect(model, [s.value.name for s in sites], self.data, self.batch_size, self.max_rows)
        modified = False
        for site in sites:
            entry = {"site": site.value.name, "consumers": [c.name for c in site.consumers], "fold": site.target,
                     "producer": _label(site.producer)}
            report.append(entry)
            rows, cmin, cmax = samples[site.value.name]
            weights = [_canonical(c) for c in site.consumers]
            x_absmax = np.maximum(np.abs(cmin), np.abs(cmax))
            w_absmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
            candidates = [None] + ([self.alpha] if self.alpha is not None else list(self.alphas))
            errors = {}
            for a in candidates:
                s = None if a is None else self.scales(rows, x_absmax, w_absmax, a, site.block)
                errors[a] = site_error(rows, cmin, cmax, weights, s, self.activations, self.weights, self.clip_search)
            best = min(candidates, key=lambda a: errors[a])
            if self.alpha is not None:
                best = self.alpha  # a fixed α is applied as asked (its error is still reported)
            entry["error_by_alpha"] = {("off" if a is None else f"{a:g}"): round(float(e), 8) for a, e in errors.items()}
            entry["error_before"], entry["error_after"] = float(errors[None]), float(errors[best])
            if best is None:
                entry.update(status="kept", reason="no α measured better than leaving the input as it is")
                self.stats["kept"] += 1
                continue
            s = self.scales(rows, x_absmax, w_absmax, best, site.block)
            _apply(model.graph, site, s)
            entry.update(status="smoothed", alpha=best, s_range=[float(s.min()), float(s.max())],
                         x_ratio_before=_ratio(x_absmax), x_ratio_after=_ratio(x_absmax / s))
            self.stats["smoothed"] += 1
            modified = True
        if modified:
            _drop_unused_initializers(model.graph)
        model.meta[self.report_key] = {"sites": report, "counters": dict(self.stats)}
        log.info("%s: %s", self.report_key, dict(self.stats))
        return ir.passes.PassResult(model, modified=modified)


# --- the scales and the error they give -------------------------------------------------------------


def smoothing_scales(x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float, block: int | None = None) -> np.ndarray:
    """s_j = max|X_j|^α / max|W_j|^(1-α) (float32, positive); with `block` < the channel count, one
    s per position within a block (the max of each position's channels over all blocks)."""
    x = np.maximum(np.asarray(x_absmax, np.float64), _MIN_S)
    w = np.maximum(np.asarray(w_absmax, np.float64), _MIN_S)
    c = len(x)
    if block is not None and block < c:
        x = np.tile(x.reshape(-1, block).max(axis=0), c // block)
        w = np.tile(w.reshape(-1, block).max(axis=0), c // block)
    s = x ** alpha / w ** (1.0 - alpha)
    return np.clip(s, _MIN_S, 1.0 / _MIN_S).astype(np.float32)


def fake_quant_activation(x: np.ndarray, spec: QuantSpec, lo: float, hi: float) -> np.ndarray:
    """x quantized and dequantized as `spec` says: per token at run time (dynamic), else with the
    static scale `lpcompile.passes.quantize` would compute from a range [lo, hi] (the percentile /
    MSE clipping forms on the sample's histogram)."""
    from lpcompile.passes.quantize import activation_scale

    fmt = spec.format
    if spec.dynamic:
        scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / fmt.max_finite, 1e-30)
        return fmt.quantize(x / scale) * scale
    st = TensorStats("x", x.shape[-1])
    if spec.percentile is not None or spec.scale_method == "mse":  # these read the histogram
        st.update(x, with_gram=False)
    st.min, st.max = float(lo), float(hi)
    scale, zp = activation_scale(st, spec)
    if zp:
        return (np.clip(np.rint(x / scale) + zp, fmt.qmin, fmt.qmax) - zp) * scale
    return fmt.quantize(x / scale) * scale


def site_error(rows: np.ndarray, cmin: np.ndarray, cmax: np.ndarray, weights: list[np.ndarray],
               s: np.ndarray | None, activations: QuantSpec | None, weight_spec: QuantSpec | None,
               clip_search: bool | None = None) -> float:
    """Σ over consumers of ‖X·W − Q(X/s)·Q(s·W)‖² / ‖X·W‖² on the sample `rows` (s None: no
    smoothing); `cmin` / `cmax` are the channels' ranges over all calibration rows (static scales)."""
    x = rows.astype(np.float32)
    lo, hi = (float(cmin.min()), float(cmax.max())) if s is None else (float((cmin / s).min()), float((cmax / s).max()))
    xs = x if s is None else x / s
    xq = fake_quant_activation(xs, activations, lo, hi) if activations is not None else xs
    total = 0.0
    clip = weight_spec is not None and weight_spec.format.bits <= 4 if clip_search is None else clip_search
    for w in weights:
        ws = w if s is None else w * s[:, None]
        wq = quantize_rtn(ws, weight_spec, clip_search=clip).dequantize() if weight_spec is not None else ws
        ref = x @ w
        total += float(((xq @ wq - ref) ** 2).sum() / max(float((ref ** 2).sum()), 1e-30))
    return total


# --- finding sites ----------------------------------------------------------------------------------


def find_sites(graph: ir.Graph) -> tuple[list[Site], list[dict]]:
    """The linear inputs whose 1/s can be folded, and a report entry (with the reason) for the rest."""
    by_value: dict[int, tuple[ir.Value, list[LinearLayer]]] = {}
    for layer in find_linear_layers(graph):
        if layer.activation is not None:
            by_value.setdefault(id(layer.activation), (layer.activation, []))[1].append(layer)
    chains = {}
    for chain in find_chains(graph):
        if not chain.problems and chain.consumers:
            acts = {id(c.activation) for c in chain.consumers}
            if len(acts) == 1:
                chains[acts.pop()] = chain
    sites, skipped = [], []
    for key, (value, consumers) in by_value.items():
        site, reason = _site(value, consumers, chains.get(key))
        if site is None:
            skipped.append({"site": value.name, "consumers": [c.name for c in consumers], "status": "skipped",
                            "reason": reason})
        else:
            sites.append(site)
    return sites, skipped


def _site(value: ir.Value, consumers: list[LinearLayer], chain) -> tuple[Site | None, str]:
    if any(c.kind == "gemm" and c.transposed is None for c in consumers):
        return None, "unsupported Gemm"
    dims = {c.in_features for c in consumers}
    if len(dims) != 1:
        return None, "consumers disagree on the input width"
    c = dims.pop()
    if value.is_graph_input() or value.is_graph_output():
        return None, "a graph input or output: nothing to fold 1/s into"
    if any(not _float_weight(l) for l in consumers):
        return None, "a consumer's weight is not float32"
    linear_uses = {id(l.node) for l in consumers}
    others = [u for u in value.uses() if id(u.node) not in linear_uses]
    producer = value.producer()
    if producer is None:
        return None, "no producer node"
    if producer.op_type in ("LayerNormalization", "RMSNormalization") and producer.domain in ("", "ai.onnx"):
        axis = producer.attributes.get("axis")
        if axis is not None and axis.as_int() not in (-1, len(value.shape or ()) - 1):
            return None, f"{producer.op_type} normalizes over more than the last axis"
        for i in (1, 2):
            v = producer.inputs[i] if len(producer.inputs) > i else None
            if i == 1 and v is None:
                return None, f"{producer.op_type} without a scale input"
            if v is not None and (v.const_value is None or v.const_value.size != c or v.is_graph_input()):
                return None, f"{producer.op_type}'s scale/bias is not a constant [{c}] vector"
        return Site(value, consumers, "norm", producer, c, others), ""
    layer = match_linear(producer) if producer.op_type in ("MatMul", "Gemm") else None
    if layer is None and producer.op_type == "Add":  # MatMul + bias: the linear layer ends at the Add
        for inp in producer.inputs:
            p = inp.producer() if inp is not None else None
            cand = match_linear(p) if p is not None and p.op_type == "MatMul" else None
            if cand is not None and cand.output is value:
                layer = cand
    if layer is not None and layer.output is value and layer.kind != "embedding" and _float_weight(layer):
        return Site(value, consumers, "linear", layer, c, others), ""
    if chain is not None and chain.producer.kind != "embedding" and _float_weight(chain.producer) and not others:
        return Site(value, consumers, "chain", chain.producer, chain.block, []), ""
    op = f"{producer.domain}::{producer.op_type}" if producer.domain not in ("", "ai.onnx") else producer.op_type
    return None, f"produced by {op}, which has no per-channel scale to fold 1/s into"


def _float_weight(layer: LinearLayer) -> bool:
    t = layer.weight.const_value
    return t is not None and t.dtype == ir.DataType.FLOAT and (layer.bias is None or (
        layer.bias.const_value is not None and layer.bias.const_value.dtype == ir.DataType.FLOAT))


# --- statistics -------------------------------------------------------------------------------------


def _collect(model: ir.Model, names: list[str], data, batch_size: int, max_rows: int):
    """Per site: up to `max_rows` rows (evenly spaced over all batches) and each channel's min/max."""
    if not names:
        return {}
    runner = OrtRunner(model, extra=names)
    rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
    lo: dict[str, np.ndarray] = {}
    hi: dict[str, np.ndarray] = {}
    for batch in data.batches(batch_size):
        out = runner.run(batch)
        for n in names:
            x = out[n].reshape(-1, out[n].shape[-1]).astype(np.float32)
            lo[n] = x.min(axis=0) if n not in lo else np.minimum(lo[n], x.min(axis=0))
            hi[n] = x.max(axis=0) if n not in hi else np.maximum(hi[n], x.max(axis=0))
            rows[n].append(x[:: max(1, len(x) // 64)])  # a thinned sample of every batch
    result = {}
    for n in names:
        all_rows = np.concatenate(rows[n])
        step = max(1, len(all_rows) // max_rows)
        result[n] = (all_rows[::step][:max_rows], lo[n], hi[n])
    return result


# --- folding ----------------------------------------------------------------------------------------


def _weight(layer: LinearLayer) -> ir.Value:
    """The layer's weight as the graph has it now (an earlier site may have replaced it)."""
    return layer.node.inputs[0 if layer.kind == "embedding" else 1]


def _canonical(layer: LinearLayer) -> np.ndarray:
    w = read_weight(_weight(layer).const_value)
    return w.T if layer.transposed else w


def _apply(graph: ir.Graph, site: Site, s: np.ndarray) -> None:
    """X ← X/s in the producer, W ← diag(s)·W in every consumer, X given back to other readers."""
    for layer in site.consumers:
        w = read_weight(_weight(layer).const_value)
        scaled = w * s[None, :] if layer.transposed else w * s[:, None]
        layer.node.replace_input_with(1, _initializer(graph, f"{layer.weight.name}_smoothed", scaled))
    if site.target == "norm":
        node = site.producer
        for i in (1, 2):
            v = node.inputs[i] if len(node.inputs) > i else None
            if v is not None:
                vec = read_weight(v.const_value).reshape(-1) / s
                node.replace_input_with(i, _initializer(graph, f"{v.name}_smoothed", vec))
    else:
        layer = site.producer
        w = read_weight(_weight(layer).const_value)
        scaled = w / s[:, None] if layer.transposed else w / s[None, :]
        layer.node.replace_input_with(1, _initializer(graph, f"{layer.weight.name}_smoothed_out", scaled))
        if layer.bias is not None:
            bias_user = layer.node if layer.kind == "gemm" else layer.output.producer()
            idx = 2 if layer.kind == "gemm" else next(i for i, v in enumerate(bias_user.inputs) if v is layer.bias)
            b = read_weight(layer.bias.const_value).reshape(-1) / s
            bias_user.replace_input_with(idx, _initializer(graph, f"{layer.bias.name}_smoothed", b))
    if site.others:
        scale = _initializer(graph, f"{site.value.name}_unsmooth", s)
        mul = ir.node("Mul", [site.value, scale], name=f"{site.value.name}_unsmooth")
        mul.outputs[0].name = f"{site.value.name}_unsmoothed"
        mul.outputs[0].dtype = site.value.dtype or ir.DataType.FLOAT
        mul.outputs[0].shape = site.value.shape
        graph.insert_after(site.value.producer(), mul)
        for use in site.others:
            use.node.replace_input_with(use.idx, mul.outputs[0])


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    base, i = name, 1
    while name in graph.initializers:
        name, i = f"{base}_{i}", i + 1
    array = np.ascontiguousarray(array, np.float32)
    value = ir.Value(name=name, const_value=new_tensor(graph, array, name))
    value.dtype = value.const_value.dtype
    value.shape = ir.Shape(array.shape)
    graph.register_initializer(value)
    return value


def _drop_unused_initializers(graph: ir.Graph) -> None:
    """The weights and norm vectors the smoothed copies replaced (where nothing else reads them)."""
    for name in list(graph.initializers):
        value = graph.initializers[name]
        if not list(value.uses()) and not value.is_graph_output():
            del graph.initializers[name]


def _label(p) -> str:
    return p.name if isinstance(p, LinearLayer) else (p.name or p.op_type)


def _ratio(absmax: np.ndarray) -> float:
    """max / median of the channels' absmax: how much louder the loudest channel is."""
    return float(absmax.max() / max(float(np.median(absmax)), 1e-30))
