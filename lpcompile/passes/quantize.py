"""quantize: materialize a quantization plan as standard ONNX QDQ.

- Weights of linear layers become low-bit initializers (int4/uint4 packed two per byte, int8,
  float8) followed by `DequantizeLinear(w_q, scale[, zero_point], axis=, block_size=)`.
- Static activations get a `QuantizeLinear -> DequantizeLinear` pair with the calibrated scale.
- Dynamic per-token activations (W4A8, W4A4) call a model-local function
  `ai.lpcompile.PerTokenQDQ_<format>` written with standard ops (Abs, ReduceMax, Div,
  QuantizeLinear/DequantizeLinear with axis=0 on a 2-D view), so any runtime executes it.

Every quantized layer is tagged in node metadata: `lpcompile.weight_format`,
`lpcompile.activation_format`, `lpcompile.weight_method`. Preserves: bounded error, measured by
`lpcompile.report`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from lpcompile.errors import PassError
from lpcompile.formats import MIN_SCALE, FloatFormat, IntFormat, PerBlock, PerChannel, QuantSpec
from lpcompile.ir import DOMAIN, upgrade_opset
from lpcompile.ir.patterns import LAYER_NAME_KEY as LAYER_KEY, LinearLayer, conv_gram_key, conv_weight_spec, find_linear_layers
from lpcompile.ir.store import new_tensor, read_weight
from lpcompile.passes.calibrate import CALIBRATION_KEY, Calibration
from lpcompile.passes.weight_quant import QuantizedWeight, gptq_applies, quantize_weight
from lpcompile.plan import PLAN_KEY, LayerChoice, Plan, check_method

log = logging.getLogger(__name__)

QDQ_OPSET = 21
WEIGHT_FORMAT_KEY = "lpcompile.weight_format"
ACTIVATION_FORMAT_KEY = "lpcompile.activation_format"
METHOD_KEY = "lpcompile.weight_method"  # the method that ran (see `effective_method`)
METHOD_NOTE_KEY = "lpcompile.weight_method_note"  # why it is not the one the plan asked for


@dataclass(frozen=True)
class Quantize(ir.passes.InPlacePass):
    """Apply a plan: each layer the plan covers gets its weights (and input) quantized as its
    `LayerChoice` says; layers it does not cover, and layers already quantized, stay as they are.

    `plan`: a `lpcompile.plan.Plan`, or None for the plan a previous pass (`UniformPlan`,
    `Select`) left in `model.meta[PLAN_KEY]`. The pass decides nothing: which layer gets what is
    the plan's. Each quantized node records the weight method that actually ran
    (`lpcompile.weight_method`: GPTQ needs the layer's XᵀX from `Calibrate(..., gram_for=...)`
    and a granularity it can use, else MSE-clipped rounding runs, and
    `lpcompile.weight_method_note` says why).
    """

    plan: Plan | None = None
    progress: Callable[[int, int], None] | None = None
    stats: Counter = field(default_factory=Counter, compare=False)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        plan = self.plan if self.plan is not None else model.meta.get(PLAN_KEY)
        if plan is None:
            raise PassError("quantize applies a plan: give Quantize(plan) or run UniformPlan / Select first")
        upgraded = upgrade_opset(model, QDQ_OPSET)  # int4 and blocked scales need opset 21 (rebuilds nodes)
        layers = find_linear_layers(model.graph)
        choices = {layer.name: plan.choice(layer.name) for layer in layers}
        calibration: Calibration | None = model.meta.get(CALIBRATION_KEY)
        needs_calibration = [n for n, c in choices.items()
                             if c is not None and c.activations is not None and not c.activations.dynamic]
        if needs_calibration and calibration is None:
            raise PassError(f"static activation scales need calibration first (layers: {needs_calibration[0]}, ...)")
        todo = [layer for layer in layers if (c := choices[layer.name]) is not None and (c.weights or c.activations)
                and not layer.node.metadata_props.get(WEIGHT_FORMAT_KEY) and not _already_quantized(layer)]
        quantized_weights: dict[tuple[str, str, str, bool], tuple[ir.Value, str, str]] = {}
        activation_qdq: dict[tuple[str, str], ir.Value] = {}
        for i, layer in enumerate(todo):
            choice = choices[layer.name]
            if choice.weights is not None:
                key = (layer.weight.name, str(choice.weights), choice.method, layer.transposed)
                if key not in quantized_weights:
                    quantized_weights[key] = self._quantize_weight(model, layer, choice, calibration)
                value, method, note = quantized_weights[key]
                layer.node.replace_input_with(0 if layer.kind == "embedding" else 1, value)
                layer.node.metadata_props[WEIGHT_FORMAT_KEY] = str(conv_weight_spec(layer, choice.weights)[0])
                layer.node.metadata_props[METHOD_KEY] = method
                if note:
                    layer.node.metadata_props[METHOD_NOTE_KEY] = note
                self.stats["weights"] += 1
                self.stats[f"method {method}"] += 1
            if choice.activations is not None and layer.activation is not None and not (
                    layer.kind == "conv" and choice.activations.dynamic):  # see plan._fit_conv
                key = (layer.activation.name, str(choice.activations))
                if key not in activation_qdq:
                    activation_qdq[key] = insert_activation_qdq(model, layer, choice.activations, calibration)
                layer.node.replace_input_with(0, activation_qdq[key])
                layer.node.metadata_props[ACTIVATION_FORMAT_KEY] = str(choice.activations)
                self.stats["activations"] += 1
            layer.node.metadata_props[LAYER_KEY] = layer.name
            if self.progress:
                self.progress(i + 1, len(todo))
        if todo:
            _drop_unused_initializers(model.graph)
            model.graph.sort()
        return ir.passes.PassResult(model, modified=bool(todo) or upgraded)

    @staticmethod
    def _quantize_weight(model: ir.Model, layer: LinearLayer, choice: LayerChoice,
                         calibration: Calibration | None) -> tuple[ir.Value, str, str]:
        """The DequantizeLinear of the layer's quantized weight, the method that ran, and why it
        is not the one asked for ("" when it is)."""
        stored = read_weight(layer.weight.const_value)
        canonical = layer.canonical(stored)
        gram = _gram(layer, calibration)
        spec, fitted = conv_weight_spec(layer, choice.weights)  # a conv's blocks stay within one kernel position
        method, note = effective_method(choice.method, spec, gram is not None)
        if layer.kind == "conv" and gram is None and method != choice.method:
            note = f"{choice.method} asked; no XᵀX over im2col patches for a grouped or transposed conv, so {method}"
        note = "; ".join(x for x in (fitted, note) if x)
        q = quantize_weight(canonical, spec, method, gram)
        del stored, canonical
        return _emit_dequantize(model.graph, layer, q), method, note


@dataclass(frozen=True)
class UniformPlan(ir.passes.InPlacePass):
    """A named recipe as a plan: the same weight / input spec for every dense linear layer and one
    spec for every embedding table, layers matched by `exclude` (fnmatch, ":first", ":last") in
    float; written to `model.meta[PLAN_KEY]` for `Quantize`. An analysis: the graph is unchanged."""

    weights: QuantSpec | None
    activations: QuantSpec | None = None
    embeddings: QuantSpec | None = None
    method: str = "gptq"
    exclude: tuple[str, ...] = ()
    name: str = "uniform"
    sparsity: str | None = None  # a pattern for every dense layer (applied by passes.sparsify.Sparsify)

    @classmethod
    def from_recipe(cls, recipe, exclude: Sequence[str] = (), sparsity: str | None = None) -> "UniformPlan":
        return cls(recipe.weights, recipe.activations, recipe.embeddings, recipe.method, tuple(exclude), recipe.name,
                   sparsity)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model.meta[PLAN_KEY] = Plan.uniform(find_linear_layers(model.graph), self.weights, self.activations,
                                            self.embeddings, self.method, self.exclude, self.name, self.sparsity)
        return ir.passes.PassResult(model, modified=False)


def _gram(layer: LinearLayer, calibration: Calibration | None) -> np.ndarray | None:
    if calibration is None or layer.activation is None:
        return None
    st = calibration.stats.get(conv_gram_key(layer) if layer.kind == "conv" else layer.activation.name)
    return st.gram if st is not None else None


def effective_method(method: str, spec: QuantSpec, has_gram: bool) -> tuple[str, str]:
    """The weight method that runs for `method` on `spec` (and why, when it differs): GPTQ needs
    the layer's XᵀX and spreads the error along the input axis, so a granularity whose groups cut
    across the input axis (channel(0), block(1, ...)) takes MSE-clipped rounding instead."""
    check_method(method)
    if method not in ("gptq", "gptq-clip"):  # gptq-clip: GPTQ with output-error clipping (passes/awq.py)
        return method, ""
    if not has_gram:
        return "mse", f"{method} asked; no calibration statistics (XᵀX) for this layer, so mse"
    if not gptq_applies(spec):
        return "mse", f"{method} asked; it cannot use granularity {spec.granularity}, so mse"
    return method, ""


def insert_activation_qdq(model: ir.Model, layer: LinearLayer, spec: QuantSpec, calibration: Calibration | None) -> ir.Value:
    """Insert `spec`'s quantize-dequantize of `layer`'s input before `layer`; returns its output
    (the layer's input is not rewired: the caller decides who reads it)."""
    x = layer.activation
    base = _fresh_base(model.graph, x.name)  # two specs of one tensor (per-layer plans) need two names
    if spec.dynamic:
        fn = _per_token_function(model, spec)
        node = ir.node(fn.name, [x], domain=DOMAIN, name=f"{base}_pertoken_qdq")
        node.outputs[0].name = f"{base}_qdq"
        node.outputs[0].dtype = x.dtype or ir.DataType.FLOAT
        node.outputs[0].shape = x.shape
        model.graph.insert_before(layer.node, node)
        return node.outputs[0]
    if x.dtype not in (None, ir.DataType.FLOAT):
        raise PassError(f"activation quantization of {x.dtype} inputs is not supported (layer {layer.name})")
    fmt = spec.format
    scale, zp = activation_scale(calibration.stats[x.name], spec)
    scale_v = _initializer(model.graph, f"{base}_scale", np.array(scale, np.float32))
    zp_v = _initializer(model.graph, f"{base}_zero_point", _storage(np.array(zp, np.float32), fmt))
    qnode = ir.node("QuantizeLinear", [x, scale_v, zp_v], name=f"{base}_quantize")
    qnode.outputs[0].name = f"{base}_q"
    dqnode = ir.node("DequantizeLinear", [qnode.outputs[0], scale_v, zp_v], name=f"{base}_dequantize")
    dqnode.outputs[0].name = f"{base}_qdq"
    dqnode.outputs[0].dtype = ir.DataType.FLOAT
    dqnode.outputs[0].shape = x.shape
    model.graph.insert_before(layer.node, [qnode, dqnode])
    return dqnode.outputs[0]


def _fresh_base(graph: ir.Graph, name: str) -> str:
    """`name`, or `name_2`, `name_3`, ... if a value `name_qdq` (what an earlier call made) exists."""
    taken = {out.name for node in graph for out in node.outputs}
    base, i = name, 1
    while f"{base}_qdq" in taken:
        i += 1
        base = f"{name}_{i}"
    return base


def activation_scale(st, spec: QuantSpec) -> tuple[float, float]:
    """The static (scale, zero point) of `spec` for a tensor with calibration statistics `st`."""
    fmt = spec.format
    if not spec.symmetric and isinstance(fmt, IntFormat):
        return _asymmetric_scale(st.min, st.max, fmt)
    return max(_activation_clip(st, spec) / fmt.max_finite, MIN_SCALE), 0.0


def _already_quantized(layer: LinearLayer) -> bool:
    producer = layer.weight.producer()
    return producer is not None and producer.op_type == "DequantizeLinear"


def _activation_clip(st, spec: QuantSpec) -> float:
    if spec.percentile is not None:
        return st.percentile(spec.percentile)
    if spec.scale_method == "mse":
        return st.mse_clip(spec.format)
    return st.absmax


def _asymmetric_scale(lo: float, hi: float, fmt: IntFormat) -> tuple[float, float]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / (fmt.qmax - fmt.qmin), MIN_SCALE)
    zp = float(np.clip(np.rint(fmt.qmin - lo / scale), fmt.qmin, fmt.qmax))
    return scale, zp


def _storage(values: np.ndarray, fmt: IntFormat | FloatFormat) -> np.ndarray:
    """Values (already in the format's grid) as the numpy storage type ONNX tensors take."""
    if fmt.numpy_dtype is None or fmt.onnx_type is None:
        raise PassError(f"{fmt.name} has no ONNX type: it needs a custom-domain op (not available yet)")
    if isinstance(fmt, IntFormat):
        return np.rint(values).astype(np.int64).astype(fmt.numpy_dtype)
    return values.astype(np.float32).astype(fmt.numpy_dtype)


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    base, i = name, 1
    while name in graph.initializers:
        name, i = f"{base}_{i}", i + 1
    value = ir.Value(name=name, const_value=new_tensor(graph, array, name))  # spilled where the graph has a store
    value.dtype = value.const_value.dtype
    value.shape = ir.Shape(array.shape)
    graph.register_initializer(value)
    return value


def _emit_dequantize(graph: ir.Graph, layer: LinearLayer, q: QuantizedWeight) -> ir.Value:
    spec = q.spec
    fmt = spec.format
    codes, scale, zp = q.codes, q.scale, q.zero_point
    attrs: dict[str, int] = {}
    g = spec.granularity
    if layer.transposed or layer.conv is not None:  # store in the original orientation ([N, K], a conv's [Cout, Cin/g, *k])
        codes = layer.to_storage(codes)
        if isinstance(g, PerBlock):
            scale = layer.to_storage(scale)
            zp = layer.to_storage(zp) if zp is not None else None
    if isinstance(g, PerChannel):
        attrs["axis"] = layer.storage_axis(g.axis)
    elif isinstance(g, PerBlock):
        attrs["axis"] = layer.storage_axis(g.axis)
        attrs["block_size"] = g.size
    name = layer.weight.name
    inputs = [
        _initializer(graph, f"{name}_q", _storage(codes, fmt)),
        _initializer(graph, f"{name}_scale", np.ascontiguousarray(scale, np.float32)),
    ]
    if zp is not None:
        inputs.append(_initializer(graph, f"{name}_zero_point", _storage(np.ascontiguousarray(zp), fmt)))
    node = ir.node("DequantizeLinear", inputs, attrs, name=f"{name}_dequantize")
    node.outputs[0].name = f"{name}_dq"
    node.outputs[0].dtype = ir.DataType.FLOAT
    node.outputs[0].shape = ir.Shape(layer.weight.shape)
    graph.insert_before(layer.node, node)
    return node.outputs[0]


def _drop_unused_initializers(graph: ir.Graph) -> None:
    for name in list(graph.initializers):
        value = graph.initializers[name]
        if not list(value.uses()) and not value.is_graph_output():
            del graph.initializers[name]


# --- dynamic per-token activations as an ONNX function --------------------------------------------


def _per_token_function(model: ir.Model, spec: QuantSpec) -> ir.Function:
    """`PerTokenQDQ_<fmt>(x) = DQ(Q(x, s), s)` with s = max|x| / max_finite per row of the last axis."""
    fmt = spec.format
    name = f"PerTokenQDQ_{fmt.name}"
    key = (DOMAIN, name, "")
    if key in model.functions:
        return model.functions[key]
    x = ir.Value(name="x")
    nodes = []

    def add(op, inputs, attrs=None, **kw):
        n = ir.node(op, inputs, attrs, **kw)
        nodes.append(n)
        return n.outputs[0]

    def const(array, label):
        return add("Constant", [], {"value": ir.Tensor(array, name=label)})

    shape = add("Shape", [x])
    rows = add("Flatten", [x], {"axis": -1})
    absmax = add("ReduceMax", [add("Abs", [rows]), const(np.array([1], np.int64), "axes")], {"keepdims": 0})
    scale = add("Max", [add("Div", [absmax, const(np.array(fmt.max_finite, np.float32), "qmax")]),
                        const(np.array(MIN_SCALE, np.float32), "tiny")])
    # No zero point (symmetric): the code type comes from output_dtype (opset 21), which also
    # avoids an Expand of an int4 zero point that onnxruntime has no kernel for.
    q = add("QuantizeLinear", [rows, scale], {"axis": 0, "output_dtype": int(fmt.onnx_type)})
    dq = add("DequantizeLinear", [q, scale], {"axis": 0})
    y = add("Reshape", [dq, shape])
    fn_graph = ir.Graph([x], [y], nodes=nodes, opset_imports={"": QDQ_OPSET}, name=name)
    fn = ir.Function(DOMAIN, name, graph=fn_graph, attributes=[])
    model.functions[key] = fn
    model.opset_imports[DOMAIN] = 1
    return fn
