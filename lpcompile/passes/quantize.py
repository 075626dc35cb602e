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

import fnmatch
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from lpcompile.errors import PassError
from lpcompile.formats import FloatFormat, IntFormat, PerBlock, PerChannel, PerTensor, QuantSpec
from lpcompile.ir import upgrade_opset
from lpcompile.ir.patterns import LinearLayer, find_linear_layers
from lpcompile.passes.calibrate import CALIBRATION_KEY, Calibration
from lpcompile.passes.weight_quant import QuantizedWeight, quantize_weight

log = logging.getLogger(__name__)

from lpcompile.ir import DOMAIN  # noqa: E402
QDQ_OPSET = 21
WEIGHT_FORMAT_KEY = "lpcompile.weight_format"
ACTIVATION_FORMAT_KEY = "lpcompile.activation_format"
METHOD_KEY = "lpcompile.weight_method"
from lpcompile.ir.patterns import LAYER_NAME_KEY as LAYER_KEY  # noqa: E402


@dataclass(frozen=True)
class LayerPlan:
    weights: QuantSpec | None
    activations: QuantSpec | None
    method: str = "mse"


@dataclass(frozen=True)
class Quantize(ir.passes.InPlacePass):
    """Quantize every linear layer's weights (and activations) as planned.

    weights / activations: the specs for MatMul/Gemm layers; `embeddings`: for Gather tables
    (activations never apply there: the input is token ids). `method`: "rtn", "mse" or "gptq"
    (GPTQ needs `Calibrate(..., gram_for=...)` to have run; it falls back to "mse" otherwise).
    `exclude`: fnmatch patterns on layer names, plus ":first" / ":last" for the first and last
    non-embedding linear layers; those stay in float. `overrides`: per-layer plans by pattern.
    """

    weights: QuantSpec | None
    activations: QuantSpec | None = None
    embeddings: QuantSpec | None = None
    method: str = "mse"
    exclude: tuple[str, ...] = ()
    overrides: tuple[tuple[str, LayerPlan], ...] = ()
    progress: Callable[[int, int], None] | None = None
    stats: Counter = field(default_factory=Counter, compare=False)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        upgraded = upgrade_opset(model, QDQ_OPSET)  # int4 and blocked scales need opset 21
        layers = find_linear_layers(model.graph)
        plans = self.plan(layers)
        calibration: Calibration | None = model.meta.get(CALIBRATION_KEY)
        needs_calibration = [n for n, p in plans.items() if p.activations is not None and not p.activations.dynamic]
        if needs_calibration and calibration is None:
            raise PassError(f"static activation scales need calibration first (layers: {needs_calibration[0]}, ...)")
        quantized_weights: dict[tuple[str, str, bool], ir.Value] = {}
        activation_qdq: dict[tuple[str, str], ir.Value] = {}
        todo = [layer for layer in layers if plans[layer.name].weights or plans[layer.name].activations]
        for i, layer in enumerate(todo):
            plan = plans[layer.name]
            if plan.weights is not None:
                key = (layer.weight.name, str(plan.weights), layer.transposed)
                if key not in quantized_weights:
                    quantized_weights[key] = self._quantize_weight(model, layer, plan, calibration)
                layer.node.replace_input_with(0 if layer.kind == "embedding" else 1, quantized_weights[key])
                layer.node.metadata_props[WEIGHT_FORMAT_KEY] = str(plan.weights)
                layer.node.metadata_props[METHOD_KEY] = self._effective_method(layer, plan, calibration)
                self.stats["weights"] += 1
            if plan.activations is not None and layer.activation is not None:
                key = (layer.activation.name, str(plan.activations))
                if key not in activation_qdq:
                    activation_qdq[key] = self._quantize_activation(model, layer, plan.activations, calibration)
                layer.node.replace_input_with(0, activation_qdq[key])
                layer.node.metadata_props[ACTIVATION_FORMAT_KEY] = str(plan.activations)
                self.stats["activations"] += 1
            layer.node.metadata_props[LAYER_KEY] = layer.name
            if self.progress:
                self.progress(i + 1, len(todo))
        _drop_unused_initializers(model.graph)
        model.graph.sort()
        return ir.passes.PassResult(model, modified=bool(todo) or upgraded)

    # --- policy: which layer gets what -----------------------------------------------------------

    def plan(self, layers: Sequence[LinearLayer]) -> dict[str, LayerPlan]:
        dense = [l for l in layers if l.kind != "embedding"]
        special = {":first": dense[0].name if dense else None, ":last": dense[-1].name if dense else None}
        plans = {}
        for layer in layers:
            if layer.kind == "embedding":
                plan = LayerPlan(self.embeddings, None, "mse")
            else:
                plan = LayerPlan(self.weights, self.activations, self.method)
            for pattern, override in self.overrides:
                if fnmatch.fnmatchcase(layer.name, pattern):
                    plan = override
            if any(special.get(p) == layer.name or fnmatch.fnmatchcase(layer.name, p) for p in self.exclude):
                plan = LayerPlan(None, None)
            if layer.node.metadata_props.get(WEIGHT_FORMAT_KEY) or _already_quantized(layer):
                plan = LayerPlan(None, None)  # re-running on our own output changes nothing
            plans[layer.name] = plan
        return plans

    # --- mechanism: weights ----------------------------------------------------------------------

    @staticmethod
    def _gram(layer: LinearLayer, calibration: Calibration | None) -> np.ndarray | None:
        if calibration is None or layer.activation is None:
            return None
        st = calibration.stats.get(layer.activation.name)
        return st.gram if st is not None else None

    def _effective_method(self, layer: LinearLayer, plan: LayerPlan, calibration: Calibration | None) -> str:
        """GPTQ needs the layer's XᵀX; without calibration it is MSE-clipped rounding."""
        if plan.method == "gptq" and self._gram(layer, calibration) is None:
            return "mse"
        return plan.method

    def _quantize_weight(
        self, model: ir.Model, layer: LinearLayer, plan: LayerPlan, calibration: Calibration | None
    ) -> ir.Value:
        stored = layer.weight.const_value.numpy().astype(np.float32)
        canonical = stored.T if layer.transposed else stored
        method = self._effective_method(layer, plan, calibration)
        q = quantize_weight(canonical, plan.weights, method, self._gram(layer, calibration))
        return _emit_dequantize(model.graph, layer, q)

    # --- mechanism: activations ------------------------------------------------------------------

    def _quantize_activation(
        self, model: ir.Model, layer: LinearLayer, spec: QuantSpec, calibration: Calibration | None
    ) -> ir.Value:
        return insert_activation_qdq(model, layer, spec, calibration)


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
    return max(_activation_clip(st, spec) / fmt.max_finite, 2.0**-24), 0.0


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
    scale = max((hi - lo) / (fmt.qmax - fmt.qmin), 2.0**-24)
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
    value = ir.Value(name=name, const_value=ir.Tensor(array, name=name))
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
    if layer.transposed:  # store in the original orientation: [N, K]
        codes = codes.T
        if isinstance(g, PerBlock):
            scale = scale.T
            zp = zp.T if zp is not None else None
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
                        const(np.array(2.0**-24, np.float32), "tiny")])
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
