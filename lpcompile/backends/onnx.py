"""The `onnx` backend's portable form: a QDQ model that onnxruntime (default session, all graph
optimizations) and OpenVINO load and run with the results of onnxruntime with optimizations off.

The quantize pass writes what our own backend matches: model-local functions in `ai.lpcompile`
(`Hadamard`, `PerTokenQDQ_<format>`) and QuantizeLinear -> DequantizeLinear pairs everywhere.
Three things in that form break other runtimes (measured with onnxruntime 1.31 and OpenVINO
2026.4, see README "Portable QDQ"):

- OpenVINO has no conversion rule for model-local functions ("No conversion rule found for
  operations: ai.lpcompile.Hadamard"): every function is inlined into standard ops.
- A Q -> DQ pair whose scale is computed at run time (dynamic per-token activations) becomes an
  OpenVINO FakeQuantize that rejects the per-row scale ("Argument shapes are inconsistent"): such a
  pair is written as the arithmetic it stands for, `Mul(Clip(Round(x / s) + zp, lo, hi) - zp, s)`
  (Round is half-to-even, as QuantizeLinear rounds; bit-identical).
- onnxruntime's QDQ selector fuses DQ(float8 x) + DQ(float8 w) + MatMul into
  MatMulIntegerToFloat, which has no float8 kernel, so a default session refuses the model
  ("Type 'tensor(float8e4m3fn)' ... of operator (MatMulIntegerToFloat) is invalid"): a float8
  activation pair is written as `Mul(Cast(Cast(Clip(x / s, -max, max), float8), float), s)`:
  bit-identical to QuantizeLinear -> DequantizeLinear in onnxruntime (the cast rounds to nearest
  even). The explicit Clip saturates where OpenVINO's Cast does not (2026.4 casts out-of-range
  values to NaN). OpenVINO converts float32 to float8 through float16, rounding twice (E4M3:
  19 - 2^-8 becomes 20, not 18), so there a few codes in a thousand land one step away; an exact
  rounding in float32 arithmetic (Veltkamp's split) was tried and dropped: OpenVINO's default
  bf16 precision on AMX CPUs turns it into zeros.

Static integer pairs and weight DequantizeLinear stay as they are: both runtimes read them and
fuse them correctly (onnxruntime: MatMulIntegerToFloat, MatMulNBits; OpenVINO: FakeQuantize and
compressed weights). `portable(model)` returns a new model; the input keeps its functions (our TVM
backend lowers them to fused kernels).
"""

from __future__ import annotations

import logging
from collections import Counter

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import InlinePass, RemoveUnusedFunctionsPass, RemoveUnusedOpsetsPass

from lpcompile.formats import IntFormat

log = logging.getLogger(__name__)

__all__ = ["portable"]

# largest finite value of each float8 code type, and the code range of each integer one
_FLOAT8_MAX = {t: float(ml_dtypes.finfo(d).max) for t, d in (
    (ir.DataType.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn), (ir.DataType.FLOAT8E4M3FNUZ, ml_dtypes.float8_e4m3fnuz),
    (ir.DataType.FLOAT8E5M2, ml_dtypes.float8_e5m2), (ir.DataType.FLOAT8E5M2FNUZ, ml_dtypes.float8_e5m2fnuz))}
_INT_RANGES = {f.onnx_type: (f.qmin, f.qmax) for f in (IntFormat(b, s) for b in (2, 4, 8) for s in (True, False))}


def portable(model: ir.Model) -> tuple[ir.Model, Counter]:
    """A copy of `model` in the portable form described above, and what was rewritten
    (counts of "inlined", "runtime_scale_qdq", "float8_qdq"). The copy shares the weights."""
    out = model.clone()
    stats: Counter = Counter()
    calls = sum(1 for g in _graphs(out) for n in g if (n.domain, n.op_type, n.overload) in out.functions)
    if out.functions:
        InlinePass()(out)
        stats["inlined"] = calls
    for graph in _graphs(out):
        for q in [n for n in graph if n.op_type == "QuantizeLinear" and n.domain in ("", "ai.onnx")]:
            kind = _rewrite_pair(graph, q)
            if kind:
                stats[kind] += 1
    RemoveUnusedFunctionsPass()(out)
    RemoveUnusedOpsetsPass()(out)
    return out, stats


def _graphs(model: ir.Model):
    yield model.graph
    yield from model.graph.subgraphs()


def _rewrite_pair(graph: ir.Graph, q: ir.Node) -> str | None:
    """Replace `q` and the DequantizeLinear nodes reading it by arithmetic when the pair is one a
    runtime misreads; the kind of pair rewritten, or None (left as it is)."""
    x, scale = q.inputs[0], q.inputs[1]
    zp = q.inputs[2] if len(q.inputs) > 2 else None
    code = q.outputs[0]
    code_type = _code_type(q)
    dqs = [use.node for use in code.uses()]
    if not dqs or code.is_graph_output() or any(
            d.op_type != "DequantizeLinear" or d.inputs[0] is not code or d.inputs[1] is not scale
            or (d.inputs[2] if len(d.inputs) > 2 else None) is not zp
            or _attr(d, "axis", 1) != _attr(q, "axis", 1) for d in dqs):
        return None  # not a plain pair: codes read by something else, or other parameters
    if _attr(q, "block_size", 0):
        return None  # blocked activation quantization: not written by lpcompile
    if code_type in _FLOAT8_MAX:
        kind = "float8_qdq"
    elif code_type in _INT_RANGES and scale.const_value is None and not _is_constant(scale):
        kind = "runtime_scale_qdq"
    else:
        return None
    with_zp = zp is not None and not _is_zero(zp)
    trailing = _trailing_ones(scale, x, _attr(q, "axis", 1))
    if x.dtype not in (None, ir.DataType.FLOAT) or (with_zp and kind == "float8_qdq") or trailing is None:
        log.warning("portable: %s left as QuantizeLinear (float32 input, zero point 0 for float8, and a known "
                    "rank needed)", q.name)
        return None
    nodes: list[ir.Node] = []
    base = code.name or q.name or "qdq"

    def add(op, inputs, attrs=None):
        n = ir.node(op, inputs, attrs, name=f"{base}_portable_{len(nodes)}")
        n.outputs[0].name = n.name
        nodes.append(n)
        return n.outputs[0]

    def const(array, label):
        return add("Constant", [], {"value": ir.Tensor(np.asarray(array), name=f"{base}_{label}")})

    def along_axis(v):  # a per-axis 1-D tensor broadcast against x
        if not trailing:
            return v
        return add("Unsqueeze", [v, const(np.arange(1, trailing + 1, dtype=np.int64), "axes")])

    s = along_axis(scale)
    scaled = add("Div", [x, s])
    if kind == "float8_qdq":
        # The explicit Clip saturates where a runtime's Cast does not (OpenVINO 2026.4 casts
        # out-of-range values to NaN, whatever `saturate` says).
        top = _FLOAT8_MAX[code_type]
        on_grid = add("Clip", [scaled, const(np.float32(-top), "lo"), const(np.float32(top), "hi")])
        y = add("Mul", [add("Cast", [add("Cast", [on_grid], {"to": int(code_type), "saturate": 1})],
                           {"to": int(ir.DataType.FLOAT)}), s])
    else:
        lo, hi = _INT_RANGES[code_type]
        rounded = add("Round", [scaled])
        zp_f = along_axis(add("Cast", [zp], {"to": int(ir.DataType.FLOAT)})) if with_zp else None
        if zp_f is not None:
            rounded = add("Add", [rounded, zp_f])
        clipped = add("Clip", [rounded, const(np.float32(lo), "lo"), const(np.float32(hi), "hi")])
        if zp_f is not None:
            clipped = add("Sub", [clipped, zp_f])
        y = add("Mul", [clipped, s])
    graph.insert_before(q, nodes)
    for d in dqs:
        out = d.outputs[0]
        y.shape, y.dtype = out.shape or x.shape, ir.DataType.FLOAT
        if out.is_graph_output():  # keep the graph output's name
            y = add("Identity", [y])
            graph.insert_before(q, nodes[-1])
            y.name = out.name
            out.name = None
            graph.outputs[graph.outputs.index(out)] = y
        ir.convenience.replace_all_uses_with(out, y)
        graph.remove(d, safe=True)
    graph.remove(q, safe=True)
    return kind


def _code_type(q: ir.Node) -> ir.DataType | None:
    if len(q.inputs) > 2 and q.inputs[2] is not None and q.inputs[2].dtype is not None:
        return q.inputs[2].dtype
    attr = q.attributes.get("output_dtype")
    if attr is not None and attr.value:
        return ir.DataType(attr.value)
    return q.outputs[0].dtype or ir.DataType.UINT8  # QuantizeLinear's default: uint8


def _trailing_ones(scale: ir.Value, x: ir.Value, axis: int) -> int | None:
    """How many unit dimensions `scale` needs after it to broadcast against `x` the way
    QuantizeLinear's `axis` says: 0 for a scalar; for a 1-D per-axis scale, the axes of `x` after
    `axis`. None when a rank is unknown."""
    rank_s = _rank(scale)
    if rank_s == 0:
        return 0
    if rank_s != 1:
        return None
    if axis < 0:
        return -axis - 1
    rank_x = _rank(x)
    return None if rank_x is None else rank_x - axis - 1


def _rank(v: ir.Value) -> int | None:
    if v.const_value is not None:
        return len(v.const_value.shape)
    if v.shape is not None:
        return len(v.shape)
    p = v.producer()
    if p is None:
        return None
    if p.op_type == "Constant":
        a = _const_array(v)
        return None if a is None else a.ndim
    if p.op_type == "Flatten":
        return 2
    if p.op_type in ("ReduceMax", "ReduceMin") and _attr(p, "keepdims", 1) == 0 and _rank(p.inputs[0]) is not None:
        axes = p.inputs[1] if len(p.inputs) > 1 else None
        if axes is not None and _const_array(axes) is not None:
            return _rank(p.inputs[0]) - _const_array(axes).size
    if p.op_type in ("Div", "Mul", "Max", "Min", "Abs", "Add", "Sub"):
        ranks = [_rank(i) for i in p.inputs if i is not None]
        return None if None in ranks else max(ranks)
    return None


def _const_array(v: ir.Value) -> np.ndarray | None:
    if v.const_value is not None:
        return v.const_value.numpy()
    p = v.producer()
    if p is not None and p.op_type == "Constant" and "value" in p.attributes:
        return p.attributes["value"].value.numpy()
    return None


def _is_constant(v: ir.Value) -> bool:
    return _const_array(v) is not None


def _is_zero(v: ir.Value) -> bool:
    a = _const_array(v)
    return a is not None and not np.any(a.astype(np.float32))


def _attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value
