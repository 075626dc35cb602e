"""sparsify: apply the plan's sparsity patterns to linear layers, error-compensated and joint with
their quantization, and store the weights compressed.

Patterns (`SparsityPattern`, the text a plan entry's `sparsity` holds):

- `N:M` ("2:4", "4:8"): in every group of M consecutive input features (the reduction axis K)
  of each output channel at most N weights are nonzero;
- a ratio ("0.5"): that share of the layer's weights is zero, anywhere (unstructured);
- an optional criterion after a colon ("2:4:wanda", "0.5:magnitude"): how the mask is chosen.
  `sparsegpt` (default): OBS-style, layer by layer, on the layer's inputs' H = XᵀX from
  calibration (Frantar & Alistarh, "SparseGPT", 2023): input rows are visited in order, the mask
  of a block is chosen where w² / [H⁻¹]ᵢᵢ is smallest on the weights as updated so far, and each
  row's error (pruning and rounding) is pushed onto the rows not yet visited. `wanda`: |w|·‖xᵢ‖
  per output channel (Sun et al., "Wanda", 2023), `magnitude`: |w| over the layer; both without
  a weight update of their own.

Joint with quantization: where the plan also gives the layer a weight format, pruning and
rounding happen in one sweep (each kept row quantized on the grid and its error propagated
together with the pruning error), not prune-then-round. With `wanda` / `magnitude` the mask is
fixed first and then the kept weights are quantized by the same error-compensated sweep (or by
MSE-clipped rounding without calibration statistics).

Representation (file size reflects the sparsity): the kept values are stored compressed in the
layer's weight format (or float32), with
- 2-bit indices for n:4 patterns (one index per kept value, four per byte): a model-local
  function `ai.lpcompile.SparseExpandNM_<n>_4` scatters them back (ScatterElements);
- a bitmask (one bit per weight) otherwise: `ai.lpcompile.SparseExpandMask` gathers the values
  at the cumulative count of set bits (CumSum, Gather, Where).
Both are written in standard ONNX ops, so onnxruntime (any optimization level) and
`onnx.inline_local_functions` (the portable output) run them. For a quantized layer the expansion
runs on the codes (exact as float32), which are cast back to the format and dequantized by the
same `DequantizeLinear` a dense layer has; for a float layer the expansion gives the weight.

Each sparsified node records `lpcompile.sparsity` (the pattern that ran) and
`lpcompile.sparsity_density` (kept / all); the report reads them. Preserves: bounded error,
measured by the report.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from lpcompile.errors import FormatError, PassError
from lpcompile.formats import IntFormat, PerBlock, PerChannel, QuantSpec
from lpcompile.ir import DOMAIN, upgrade_opset
from lpcompile.calibration_data import CalibrationData
from lpcompile.ir.patterns import LAYER_NAME_KEY, LinearLayer, find_linear_layers
from lpcompile.ir.run import OrtRunner
from lpcompile.ir.store import read_weight
from lpcompile.passes.calibrate import CALIBRATION_KEY, Calibration
from lpcompile.passes.quantize import (ACTIVATION_FORMAT_KEY, METHOD_KEY, METHOD_NOTE_KEY, QDQ_OPSET,
                                       WEIGHT_FORMAT_KEY, _initializer, _storage, insert_activation_qdq)
from lpcompile.passes.weight_quant import _inverse_cholesky_upper, _to_codes, expand_groups, find_scales, quantize_weight
from lpcompile.plan import PLAN_KEY, Plan

log = logging.getLogger(__name__)

SPARSITY_KEY = "lpcompile.sparsity"  # node metadata: the pattern that ran ("2:4:sparsegpt")
DENSITY_KEY = "lpcompile.sparsity_density"  # node metadata: kept weights / all weights
CRITERIA = ("sparsegpt", "wanda", "magnitude")
BLOCK = 128  # rows (input features) per block of the sweep (SparseGPT's lazy-update block)


@dataclass(frozen=True)
class SparsityPattern:
    """`n` of every `m` weights kept along K (`m` > 0), or a share `ratio` of the weights pruned
    anywhere (`m` == 0); `criterion` chooses the mask. `str()` parses back (`SparsityPattern.parse`)."""

    n: int = 0
    m: int = 0
    ratio: float = 0.0
    criterion: str = "sparsegpt"

    def __post_init__(self):
        if self.criterion not in CRITERIA:
            raise FormatError(f"unknown sparsity criterion {self.criterion!r}; choose one of: {', '.join(CRITERIA)}")
        if self.m:
            if not (0 < self.n < self.m <= 32):
                raise FormatError(f"sparsity {self.n}:{self.m}: need 0 < N < M <= 32")
        elif not (0.0 < self.ratio < 1.0):
            raise FormatError(f"sparsity ratio {self.ratio!r}: need a share of pruned weights strictly between 0 and 1")

    @classmethod
    def parse(cls, text: "str | SparsityPattern") -> "SparsityPattern":
        """'2:4', '4:8', '0.5', optionally with ':sparsegpt' | ':wanda' | ':magnitude'."""
        if isinstance(text, SparsityPattern):
            return text
        if not isinstance(text, str) or not text.strip():
            raise FormatError(f"sparsity must be N:M (2:4, 4:8) or a pruned share (0.5), got {text!r}")
        parts = text.strip().split(":")
        criterion = "sparsegpt"
        if parts[-1] in CRITERIA:
            criterion = parts.pop()
        try:
            numbers = [int(parts[0]), int(parts[1])] if len(parts) == 2 else [float(parts[0])] if len(parts) == 1 else []
        except ValueError:
            numbers = []
        if len(numbers) == 2:
            return cls(numbers[0], numbers[1], 0.0, criterion)
        if len(numbers) == 1:
            return cls(ratio=numbers[0], criterion=criterion)
        raise FormatError(f"sparsity must be N:M (2:4, 4:8) or a pruned share (0.5), optionally :{'|:'.join(CRITERIA)}; "
                          f"got {text!r}")

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def density(self) -> float:
        return self.n / self.m if self.m else 1.0 - self.ratio

    def __str__(self) -> str:
        base = f"{self.n}:{self.m}" if self.m else f"{self.ratio:g}"
        return base if self.criterion == "sparsegpt" else f"{base}:{self.criterion}"


def check_sparsity(text: str | None) -> str | None:
    """`text` normalised (None stays None); FormatError when it does not parse."""
    return None if text is None else str(SparsityPattern.parse(text))


def sparse_weight_bits(spec: QuantSpec | None, k: int, n: int, pattern: "SparsityPattern | str") -> int:
    """Bits of a [K, N] weight stored compressed: the kept values (in `spec`, or float32), the
    index (2 bits per kept value for n:4, else one mask bit per weight) and `spec`'s scales."""
    from lpcompile.plan import weight_bits

    p = SparsityPattern.parse(pattern)
    kept = int(round(k * n * p.density))
    index = 2 * kept if _index_form(p, k) else k * n
    dense = weight_bits(spec, k, n)
    value_bits = spec.format.bits if spec is not None else 32
    return dense - k * n * value_bits + kept * value_bits + index


# --- masks ---------------------------------------------------------------------------------------


def nm_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the `n` highest `scores` of every `m` consecutive rows (K) in each column: bool [K, N]."""
    k, cols = scores.shape
    groups = scores.reshape(k // m, m, cols)
    order = np.argsort(-groups, axis=1, kind="stable")[:, :n, :]
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order, True, axis=1)
    return keep.reshape(k, cols)


def ratio_mask(scores: np.ndarray, ratio: float, per_column: bool) -> np.ndarray:
    """Prune the lowest share `ratio` of `scores` (in each column, or over the whole array)."""
    if per_column:
        k = scores.shape[0]
        drop = int(round(k * ratio))
        order = np.argsort(scores, axis=0, kind="stable")[:drop]
        keep = np.ones(scores.shape, dtype=bool)
        np.put_along_axis(keep, order, False, axis=0)
        return keep
    drop = int(round(scores.size * ratio))
    keep = np.ones(scores.size, dtype=bool)
    keep[np.argsort(scores, axis=None, kind="stable")[:drop]] = False
    return keep.reshape(scores.shape)


def cheap_mask(w: np.ndarray, pattern: SparsityPattern, sq_norms: np.ndarray | None) -> np.ndarray:
    """The mask of `magnitude` (|w|) or `wanda` (|w|·‖xᵢ‖, per output channel) on [K, N] weights."""
    scores = np.abs(w)
    if pattern.criterion == "wanda":
        if sq_norms is None:
            raise PassError("wanda needs the layer's input norms from calibration")
        scores = scores * np.sqrt(np.maximum(sq_norms, 0.0))[:, None]
    if pattern.structured:
        return nm_mask(scores, pattern.n, pattern.m)
    return ratio_mask(scores, pattern.ratio, per_column=pattern.criterion == "wanda")


# --- the joint sweep -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SparseWeight:
    """A sparsified [K, N] weight: `keep` (bool), `values` (float32: the weight, or the codes of
    `spec` when quantized; zero where pruned), `scale` / `zero_point` as `QuantizedWeight` has them."""

    keep: np.ndarray
    values: np.ndarray
    spec: QuantSpec | None
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None

    def dequantize(self) -> np.ndarray:
        if self.spec is None:
            return self.values
        return self.values * expand_groups(self.scale, self.spec, self.values.shape)

    @property
    def density(self) -> float:
        return float(self.keep.mean())


def sparsify_weight(w: np.ndarray, pattern: SparsityPattern, spec: QuantSpec | None = None,
                    gram: np.ndarray | None = None, method: str = "gptq", damp: float = 0.01) -> SparseWeight:
    """Prune canonical [K, N] weights by `pattern` and (with `spec`) quantize the kept ones.

    `gram`: H = XᵀX [K, K] of the layer's inputs. SparseGPT needs it; wanda needs its diagonal.
    With a gram the quantization of the kept weights is error-compensated (joint sweep) unless
    `method` is "rtn"/"mse"."""
    w = np.asarray(w, np.float64)
    k, _ = w.shape
    if pattern.structured and k % pattern.m:
        raise PassError(f"{pattern.n}:{pattern.m} needs the input features ({k}) to be a multiple of {pattern.m}")
    if spec is not None and not spec.symmetric:
        raise PassError(f"sparse weights need a symmetric format (a pruned weight is code 0), got {spec}")
    if spec is not None and isinstance(spec.granularity, (PerBlock, PerChannel)) and not _along_k(spec):
        raise PassError(f"sparse quantized weights need scales along the input axis, got {spec}")
    if pattern.criterion == "sparsegpt" and gram is None:
        raise PassError("sparsegpt needs the layer's XᵀX from calibration (or use :wanda / :magnitude)")
    keep = None
    if pattern.criterion != "sparsegpt":
        keep = cheap_mask(w, pattern, np.diag(gram) if gram is not None else None)
        if spec is None:
            return SparseWeight(keep, (w * keep).astype(np.float32), None)
        if gram is None or method != "gptq":
            q = quantize_weight((w * keep).astype(np.float32), spec, "rtn" if method == "rtn" else "mse")
            return SparseWeight(keep, q.codes * keep, spec, q.scale, q.zero_point)
        w = w * keep  # pruned without compensation; the sweep only rounds (GPTQ keeping the mask)
    return _sweep(w, gram, pattern, spec, keep, damp)


def _along_k(spec: QuantSpec) -> bool:
    g = spec.granularity
    return not (isinstance(g, PerBlock) and g.axis != 0 or isinstance(g, PerChannel) and g.axis != 1)


def _sweep(w: np.ndarray, gram: np.ndarray, pattern: SparsityPattern, spec: QuantSpec | None,
           keep: np.ndarray | None, damp: float) -> SparseWeight:
    """Rows in order; a block's mask (unstructured) or a group's (N:M) chosen when the sweep
    enters it, unless `keep` fixes it; each row pruned and rounded, its error spread over the
    rows to come by the inverse-Hessian's Cholesky factor (as GPTQ does for rounding alone)."""
    k, n = w.shape
    h = np.array(gram, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    u = _inverse_cholesky_upper(h)
    d = np.diag(u)
    fmt = spec.format if spec is not None else None
    scale = full_s = None
    if spec is not None:
        scale, _ = find_scales(w.astype(np.float32), spec, clip_search=True, importance=np.diag(gram).copy())
        full_s = np.array(expand_groups(scale, spec, (k, n)), np.float64)
    block = BLOCK if not pattern.structured else max(pattern.m, BLOCK // pattern.m * pattern.m)
    out = np.zeros((k, n), np.float32)
    mask = np.ones((k, n), bool) if keep is None else keep.copy()
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = w[b0:b1].copy()
        err = np.zeros_like(wb)
        if keep is None and not pattern.structured:
            saliency = wb**2 / (d[b0:b1, None] ** 2)
            mask[b0:b1] = ratio_mask(saliency, pattern.ratio, per_column=False)
        for i in range(b1 - b0):
            row = b0 + i
            if keep is None and pattern.structured and i % pattern.m == 0:
                g = slice(i, i + pattern.m)
                mask[row : row + pattern.m] = nm_mask(wb[g] ** 2 / (d[row : row + pattern.m, None] ** 2),
                                                      pattern.n, pattern.m)
            if spec is not None:
                codes = _to_codes(wb[i], full_s[row], None, fmt) * mask[row]
                out[row] = codes
                deq = codes * full_s[row]
            else:
                deq = wb[i] * mask[row]
                out[row] = deq
            err[i] = (wb[i] - deq) / u[row, row]
            wb[i + 1 :] -= np.outer(u[row, row + 1 : b1], err[i])
        w[b1:] -= u[b0:b1, b1:].T @ err
    out[~mask] = 0.0
    return SparseWeight(mask, out, spec, scale, None)


# --- the pass ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sparsify(ir.passes.InPlacePass):
    """Apply the sparsity of each plan entry that asks for one (`LayerChoice.sparsity`): prune,
    quantize jointly where the entry gives a weight format, store compressed (see the module
    docstring), and quantize the layer's input as the entry says. Layers without sparsity are
    left for `Quantize`, which runs after this pass. Embedding tables and convolutions are not
    sparsified (logged and counted in `stats`)."""

    plan: Plan | None = None
    damp: float = 0.01
    data: CalibrationData | None = None  # re-measure each layer's XᵀX on the model pruned so far
    batch_size: int = 8
    stats: Counter = field(default_factory=Counter, compare=False)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        plan = self.plan if self.plan is not None else model.meta.get(PLAN_KEY)
        if plan is None:
            raise PassError("sparsify applies a plan: give Sparsify(plan) or run UniformPlan / Select first")
        calibration: Calibration | None = model.meta.get(CALIBRATION_KEY)
        wanted = []
        for layer in find_linear_layers(model.graph):
            choice = plan.choice(layer.name)
            if choice is None or not choice.sparsity:
                continue
            if layer.kind not in ("matmul", "gemm"):
                log.info("sparsify: skip %s: %s layers are not sparsified", layer.name, layer.kind)
                self.stats[f"skipped {layer.kind}"] += 1
                continue
            wanted.append(layer.name)
        if not wanted:
            return ir.passes.PassResult(model, modified=False)
        upgrade_opset(model, QDQ_OPSET)  # as Quantize would (it rebuilds nodes): before ours exist
        todo = [(layer, plan.choice(layer.name)) for layer in find_linear_layers(model.graph) if layer.name in wanted]
        activation_qdq: dict[tuple[str, str], ir.Value] = {}
        measured: dict[str, np.ndarray] = {}
        for layer, choice in todo:
            pattern = SparsityPattern.parse(choice.sparsity)
            gram = _gram(layer, calibration)
            if self.data is not None and layer.activation is not None and _needs_gram(pattern, choice):
                # Sequential (as SparseGPT runs): the input statistics of this layer are measured on
                # the model with every earlier layer already pruned (and quantized), so each layer
                # compensates the error that reaches it, not the float model's inputs.
                if layer.activation.name not in measured:
                    measured.clear()
                    measured[layer.activation.name] = self._measure_gram(model, layer.activation.name)
                    self.stats["sequential measurements"] += 1
                gram = measured[layer.activation.name]
            if pattern.criterion in ("sparsegpt", "wanda") and gram is None:
                raise PassError(f"sparsity {pattern} of layer {layer.name} needs calibration statistics (XᵀX) first")
            stored = read_weight(layer.weight.const_value)
            canonical = stored.T if layer.transposed else stored
            sw = sparsify_weight(canonical, pattern, choice.weights, gram, choice.method, self.damp)
            value = emit_sparse_weight(model, layer, sw)
            node = layer.node
            node.replace_input_with(0 if layer.kind == "embedding" else 1, value)
            node.metadata_props[SPARSITY_KEY] = str(pattern)
            node.metadata_props[DENSITY_KEY] = f"{sw.density:.6f}"
            node.metadata_props[LAYER_NAME_KEY] = layer.name
            if choice.weights is not None:
                node.metadata_props[WEIGHT_FORMAT_KEY] = str(choice.weights)
                joint = gram is not None and choice.method == "gptq"
                node.metadata_props[METHOD_KEY] = "gptq" if joint else ("rtn" if choice.method == "rtn" else "mse")
                node.metadata_props[METHOD_NOTE_KEY] = (
                    f"pruned ({pattern}) and quantized in one error-compensated sweep" if joint
                    else f"pruned ({pattern}), then the kept weights rounded")
            if choice.activations is not None and layer.activation is not None:
                key = (layer.activation.name, str(choice.activations))
                if key not in activation_qdq:
                    activation_qdq[key] = insert_activation_qdq(model, layer, choice.activations, calibration)
                node.replace_input_with(0, activation_qdq[key])
                node.metadata_props[ACTIVATION_FORMAT_KEY] = str(choice.activations)
            self.stats["sparsified"] += 1
            self.stats[f"pattern {pattern}"] += 1
        _drop_unused(model.graph)
        model.graph.sort()
        return ir.passes.PassResult(model, modified=True)


    def _measure_gram(self, model: ir.Model, name: str) -> np.ndarray:
        """XᵀX of the value `name` over `data`, on the model as it is now."""
        _drop_unused(model.graph)  # the weights replaced so far (onnxruntime refuses unused handed-over weights)
        runner = OrtRunner(model, extra=[name])
        gram = None
        for batch in self.data.batches(self.batch_size):
            x = runner.run(batch)[name]
            rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
            gram = rows.T @ rows if gram is None else gram + rows.T @ rows
        return gram


def _needs_gram(pattern: SparsityPattern, choice) -> bool:
    return pattern.criterion != "magnitude" or choice.weights is not None and choice.method == "gptq"


def _gram(layer: LinearLayer, calibration: Calibration | None) -> np.ndarray | None:
    if calibration is None or layer.activation is None:
        return None
    st = calibration.stats.get(layer.activation.name)
    return st.gram if st is not None else None


def _drop_unused(graph: ir.Graph) -> None:
    for name in list(graph.initializers):
        value = graph.initializers[name]
        if not list(value.uses()) and not value.is_graph_output():
            del graph.initializers[name]


# --- representation ------------------------------------------------------------------------------


def _index_form(pattern: SparsityPattern, k: int) -> bool:
    """n:4 with whole bytes of indices per output row: values + 2-bit indices; else a bitmask."""
    return pattern.structured and pattern.m == 4 and (k // 4 * pattern.n) % 4 == 0


def compress(sw: SparseWeight, pattern: SparsityPattern | None = None) -> dict:
    """The stored form of `sw` in rows = output channels ([N, K], K contiguous): {"values": 1-D
    kept values in row-major order, and "indices" (uint8 [N, K*n/m/4], 2-bit positions within
    each group of 4, lowest bits first) or "mask" (uint8, one bit per weight of [N, K], little
    endian)}."""
    keep = sw.keep.T
    values = sw.values.T
    n_out, k = keep.shape
    kept_per_group = keep.reshape(n_out, -1, 4).sum(axis=2) if k % 4 == 0 else None
    if (pattern is not None and _index_form(pattern, k) and kept_per_group is not None
            and (kept_per_group == pattern.n).all()):
        groups = keep.reshape(n_out, k // 4, 4)
        pos = np.nonzero(groups)[2].reshape(n_out, -1).astype(np.uint8)  # row-major: per group, ascending
        packed = (pos.reshape(n_out, -1, 4) << np.array([0, 2, 4, 6], np.uint8)).sum(axis=2).astype(np.uint8)
        return {"values": values[keep], "indices": packed, "n": pattern.n}
    return {"values": values[keep], "mask": np.packbits(keep.reshape(-1), bitorder="little")}


def emit_sparse_weight(model: ir.Model, layer: LinearLayer, sw: SparseWeight) -> ir.Value:
    """The compressed weight and the nodes that expand (and dequantize) it, inserted before the
    layer; returns the value that replaces the layer's weight input."""
    graph = model.graph
    form = compress(sw, _pattern_of(sw))
    name = layer.weight.name
    k, n = sw.keep.shape
    nodes: list[ir.Node] = []

    def add(op, inputs, attrs=None, domain="", label=""):
        node = ir.node(op, inputs, attrs, domain=domain, name=f"{name}_{label or op.lower()}")
        node.outputs[0].name = f"{name}_{label or op.lower()}_out"
        nodes.append(node)
        return node.outputs[0]

    spec = sw.spec
    values = form["values"]
    if values.size == 0:  # nothing kept: one dummy value keeps Gather's input non-empty
        values = np.zeros(1, np.float32)
    stored = _storage(values, spec.format) if spec is not None else values.astype(np.float32)
    v = _initializer(graph, f"{name}_sparse_values", stored)
    if spec is not None:
        v = add("Cast", [v], {"to": ir.DataType.FLOAT}, label="values_f32")
    if "indices" in form:
        idx = _initializer(graph, f"{name}_sparse_indices", form["indices"])
        fn = _nm_function(model, form["n"])
        rows = _initializer(graph, f"{name}_sparse_shape", np.array([n, -1, form["n"]], np.int64))
        dense = add(fn.name, [add("Reshape", [v, rows], label="values_rows"), idx], domain=DOMAIN, label="expand")
    else:
        mask = _initializer(graph, f"{name}_sparse_mask", form["mask"])
        shape = _initializer(graph, f"{name}_sparse_shape", np.array([n, k], np.int64))
        dense = add(_mask_function(model).name, [v, mask, shape], domain=DOMAIN, label="expand")
    if not layer.transposed:  # stored as [K, N]: the expansion gives [N, K]
        dense = add("Transpose", [dense], {"perm": [1, 0]})
    if spec is not None:
        codes = add("Cast", [dense], {"to": spec.format.onnx_type}, label="codes")
        dense = _dequantize(graph, layer, codes, sw, add)
    out = nodes[-1].outputs[0]
    out.dtype = ir.DataType.FLOAT
    out.shape = ir.Shape(layer.weight.shape)
    graph.insert_before(layer.node, nodes)
    return dense


def _pattern_of(sw: SparseWeight) -> SparsityPattern | None:
    """The n:4 pattern `sw.keep` follows exactly (for the index form), else None."""
    k, _ = sw.keep.shape
    if k % 4:
        return None
    per_group = sw.keep.reshape(k // 4, 4, -1).sum(axis=1)
    n = int(per_group.max(initial=0))
    if 0 < n < 4 and (per_group == n).all():
        return SparsityPattern(n, 4)
    return None


def _dequantize(graph: ir.Graph, layer: LinearLayer, codes: ir.Value, sw: SparseWeight, add) -> ir.Value:
    """DequantizeLinear of the dense codes with `sw`'s scales, laid out as the stored weight."""
    g = sw.spec.granularity
    scale = sw.scale
    attrs: dict[str, int] = {}
    if isinstance(g, PerBlock):
        scale = scale.T if layer.transposed else scale
        attrs = {"axis": layer.storage_axis(g.axis), "block_size": g.size}
    elif isinstance(g, PerChannel):
        attrs = {"axis": layer.storage_axis(g.axis)}
    s = _initializer(graph, f"{layer.weight.name}_scale", np.ascontiguousarray(scale, np.float32))
    return add("DequantizeLinear", [codes, s], attrs, label="dequantize")


def _nm_function(model: ir.Model, n: int) -> ir.Function:
    """`SparseExpandNM_<n>_4(values [R, G, n] float, indices [R, G*n/4] uint8) -> [R, 4G]`."""
    name = f"SparseExpandNM_{n}_4"
    key = (DOMAIN, name, "")
    if key in model.functions:
        return model.functions[key]
    values, packed = ir.Value(name="values"), ir.Value(name="indices")
    b = _Builder()
    shifts = b.const(np.array([0, 2, 4, 6], np.uint8), "shifts")
    bits = b.add("BitwiseAnd", [b.add("BitShift", [b.add("Unsqueeze", [packed, b.const(np.array([2], np.int64), "ax")]),
                                                     shifts], {"direction": "RIGHT"}),
                               b.const(np.array(3, np.uint8), "two_bits")])
    index = b.add("Cast", [b.add("Reshape", [bits, b.add("Shape", [values])])], {"to": ir.DataType.INT64})
    group_shape = b.add("Concat", [b.add("Shape", [values], {"end": 2}), b.const(np.array([4], np.int64), "m")],
                        {"axis": 0})
    zeros = b.add("ConstantOfShape", [group_shape], {"value": ir.tensor(np.zeros(1, np.float32))})
    dense = b.add("ScatterElements", [zeros, index, values], {"axis": 2})
    y = b.add("Reshape", [dense, b.const(np.array([0, -1], np.int64), "rows")])
    return _register(model, name, [values, packed], y, b.nodes)


def _mask_function(model: ir.Model) -> ir.Function:
    """`SparseExpandMask(values [nnz] float, mask [ceil(numel/8)] uint8, shape int64) -> shape`:
    the i-th set bit (little endian within a byte) takes values[i]; clear bits are 0."""
    name = "SparseExpandMask"
    key = (DOMAIN, name, "")
    if key in model.functions:
        return model.functions[key]
    values, packed, shape = ir.Value(name="values"), ir.Value(name="mask"), ir.Value(name="shape")
    b = _Builder()
    shifts = b.const(np.arange(8, dtype=np.uint8), "shifts")
    bits = b.add("BitwiseAnd", [b.add("BitShift", [b.add("Unsqueeze", [packed, b.const(np.array([1], np.int64), "ax")]),
                                                     shifts], {"direction": "RIGHT"}),
                               b.const(np.array(1, np.uint8), "one_bit")])
    numel = b.add("ReduceProd", [shape], {"keepdims": 1})
    flat = b.add("Slice", [b.add("Reshape", [bits, b.const(np.array([-1], np.int64), "flat")]),
                           b.const(np.array([0], np.int64), "start"), numel])
    count = b.add("Cast", [flat], {"to": ir.DataType.INT64})
    position = b.add("Max", [b.add("Sub", [b.add("CumSum", [count, b.const(np.array(0, np.int64), "axis0")]),
                                           b.const(np.array(1, np.int64), "one")]),
                             b.const(np.array(0, np.int64), "zero")])
    gathered = b.add("Gather", [values, position], {"axis": 0})
    kept = b.add("Cast", [flat], {"to": ir.DataType.BOOL})
    dense = b.add("Where", [kept, gathered, b.const(np.array(0.0, np.float32), "fill")])
    y = b.add("Reshape", [dense, shape])
    return _register(model, name, [values, packed, shape], y, b.nodes)


class _Builder:
    def __init__(self):
        self.nodes: list[ir.Node] = []

    def add(self, op, inputs, attrs=None):
        node = ir.node(op, inputs, attrs)
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, array, label):
        return self.add("Constant", [], {"value": ir.Tensor(array, name=label)})


def _register(model: ir.Model, name: str, inputs, output, nodes) -> ir.Function:
    graph = ir.Graph(inputs, [output], nodes=nodes, opset_imports={"": QDQ_OPSET}, name=name)
    fn = ir.Function(DOMAIN, name, graph=graph, attributes=[])
    model.functions[(DOMAIN, name, "")] = fn
    model.opset_imports[DOMAIN] = 1
    return fn


def sparse_weight_bytes(node: ir.Node) -> tuple[int, int]:
    """(bytes of the layer's weight in float32, bytes stored for it: every initializer its
    expansion reads, values, indices or mask, scales) for a node Sparsify rewrote."""
    weight = node.inputs[1]
    numel = int(np.prod([int(d) for d in weight.shape])) if weight.shape is not None else 0
    seen, stack, stored = set(), [weight], 0
    while stack:
        value = stack.pop()
        if value is None or id(value) in seen:
            continue
        seen.add(id(value))
        if value.const_value is not None and value.is_initializer():
            t = value.const_value
            stored += -(-int(np.prod([int(d) for d in t.shape], dtype=np.int64)) * t.dtype.bitwidth // 8)
            continue
        producer = value.producer()
        if producer is not None:
            stack.extend(producer.inputs)
    return numel * 4, stored
