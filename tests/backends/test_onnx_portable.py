"""lpcompile.backends.onnx.portable: golden rewrites, the pairs it leaves alone, and bit-identity
with QuantizeLinear -> DequantizeLinear in onnxruntime (optimizations off) on values that round
at ties and saturate."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest

from lpcompile.backends.onnx import portable
from lpcompile.formats import INT4, INT8, QuantSpec
from lpcompile.ir.patterns import find_linear_layers
from lpcompile.passes.quantize import insert_activation_qdq
from tests.conftest import ort_run


def _parse(text: str, **initializers) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    for name, array in initializers.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    return ir.serde.deserialize_model(proto)


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def _hard_inputs(shape, rng) -> np.ndarray:
    """Normal values, with every 7th an exact tie of the int grid after the per-row scale
    (x / s = k + 0.5) and a few far outside any range."""
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., ::7] = (np.round(x[..., ::7] * 4) + 0.5) / 4
    x[..., 3] = 1e4
    return x


def _per_token_model(spec: QuantSpec) -> ir.Model:
    model = _parse("""<ir_version: 10, opset_import: ["" : 21]>
        g (float[B,S,64] x) => (float[B,S,32] y) { y = MatMul(x, w) }""",
                   w=np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32))
    layer = find_linear_layers(model.graph)[0]
    layer.node.replace_input_with(0, insert_activation_qdq(model, layer, spec, None))
    return model


@pytest.mark.parametrize("fmt", [INT8, INT4])
def test_per_token_function_becomes_round_and_clip_bit_identically(fmt):
    model = _per_token_model(QuantSpec.parse(f"{fmt.name}:token:sym:dynamic"))
    assert model.functions
    out, stats = portable(model)
    assert stats == {"inlined": 1, "runtime_scale_qdq": 1}
    assert not out.functions and "ai.lpcompile" not in out.opset_imports
    ops = _ops(out)
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    assert {"Round", "Clip", "Unsqueeze"} <= set(ops)
    assert model.functions and any(n.domain == "ai.lpcompile" for n in model.graph)  # the input is left as it was
    x = _hard_inputs((3, 5, 64), np.random.default_rng(1))
    np.testing.assert_array_equal(ort_run(out, {"x": x})[0], ort_run(model, {"x": x})[0])


@pytest.mark.parametrize("code, dtype", [("float8e4m3fn", ml_dtypes.float8_e4m3fn), ("float8e5m2", ml_dtypes.float8_e5m2)])
def test_float8_pair_becomes_clip_and_casts_bit_identically(code, dtype):
    model = _parse(f"""<ir_version: 10, opset_import: ["" : 21]>
        g (float[N,64] x) => (float[N,32] y) {{
            s = Constant <value = float {{0.05}}> ()
            q = QuantizeLinear(x, s, zp)
            xd = DequantizeLinear(q, s, zp)
            wd = DequantizeLinear(wq, ws)
            y = MatMul(xd, wd)
        }}""", zp=np.zeros((), dtype), wq=np.random.default_rng(0).standard_normal((64, 32)).astype(dtype),
                   ws=np.float32(0.1))
    out, stats = portable(model)
    assert stats == {"float8_qdq": 1}
    ops = _ops(out)
    assert ops.count("Cast") == 2 and "Clip" in ops and "QuantizeLinear" not in ops
    assert ops.count("DequantizeLinear") == 1  # the weight's: alone on a MatMul input it fuses into nothing
    x = _hard_inputs((16, 64), np.random.default_rng(2)) * 10  # 1e5 saturates in both formats
    np.testing.assert_array_equal(ort_run(out, {"x": x})[0], ort_run(model, {"x": x})[0])


def test_static_integer_pairs_and_shared_codes_are_left_alone():
    model = _parse("""<ir_version: 10, opset_import: ["" : 21]>
        g (float[N,8] x) => (float[N,8] y, uint8[N,8] codes) {
            s = Constant <value = float {0.05}> ()
            zp = Constant <value = uint8 {128}> ()
            q = QuantizeLinear(x, s, zp)
            y = DequantizeLinear(q, s, zp)
            codes = Identity(q)
        }""")
    out, stats = portable(model)
    assert not stats and _ops(out) == _ops(model)  # a static uint8 pair: both runtimes read it as it is
    model = _parse("""<ir_version: 10, opset_import: ["" : 21]>
        g (float[N,8] x) => (float[N,8] y, int8[N,8] codes) {
            a = Abs(x)
            m = ReduceMax <keepdims = 0> (a)
            s = Div(m, c127)
            q = QuantizeLinear <output_dtype = 3> (x, s)
            y = DequantizeLinear(q, s)
            codes = Identity(q)
        }""", c127=np.float32(127))
    out, stats = portable(model)
    assert not stats and "QuantizeLinear" in _ops(out)  # the codes are read by another node: not a plain pair


def test_a_pair_that_is_a_graph_output_keeps_its_name_and_a_second_run_changes_nothing():
    model = _parse("""<ir_version: 10, opset_import: ["" : 21]>
        g (float[N,8] x) => (float[N,8] y) {
            s = Constant <value = float {0.5}> ()
            q = QuantizeLinear <output_dtype = 17> (x, s)
            y = DequantizeLinear(q, s)
        }""")
    out, stats = portable(model)
    assert stats == {"float8_qdq": 1} and [v.name for v in out.graph.outputs] == ["y"]
    x = _hard_inputs((4, 8), np.random.default_rng(3))
    np.testing.assert_array_equal(ort_run(out, {"x": x})[0], ort_run(model, {"x": x})[0])
    again, stats = portable(out)
    assert not stats and _ops(again) == _ops(out)


def test_a_runtime_scale_with_a_zero_point_and_an_axis_is_rewritten_bit_identically():
    model = _parse("""<ir_version: 10, opset_import: ["" : 21]>
        g (float[N,8,6] x) => (float[N,8,6] y) {
            a = Abs(x)
            m = ReduceMax <keepdims = 0> (a, axes)
            s = Div(m, c127)
            q = QuantizeLinear <axis = 1> (x, s, zp)
            y = DequantizeLinear <axis = 1> (q, s, zp)
        }""", c127=np.float32(127), zp=np.full(8, 128, np.uint8), axes=np.array([0, 2], np.int64))
    out, stats = portable(model)
    assert stats == {"runtime_scale_qdq": 1} and "Unsqueeze" in _ops(out) and "Sub" in _ops(out)
    x = _hard_inputs((3, 8, 6), np.random.default_rng(4))
    np.testing.assert_array_equal(ort_run(out, {"x": x})[0], ort_run(model, {"x": x})[0])
