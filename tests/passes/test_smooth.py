"""smooth: the folded scale migration leaves the float model's outputs unchanged (onnxruntime,
fp32 tolerance) for each fold target (a LayerNorm read also by a residual Add, a linear layer's
output columns); producers with no per-channel scale are skipped with the reason; the α the
search picks lowers the W8A8 output error below α = 0 and below no smoothing (numpy reference)."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from lpcompile.calibration_data import as_calibration_data
from lpcompile.errors import PassError
from lpcompile.formats import QuantSpec
from lpcompile.passes.smooth import REPORT_KEY, Smooth, smoothing_scales
from tests.conftest import ort_run

W8 = QuantSpec.parse("int8:channel(1):sym")
A8 = QuantSpec.parse("uint8:tensor:asym")

GRAPH = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[N, 16] x) => (float[N, 16] y, float[N, 16] z)
{
  ln = LayerNormalization <axis = -1> (x, gamma, beta)
  q = MatMul (ln, wq)
  qb = Add (q, bq)
  k = MatMul (ln, wk)
  z = Add (ln, k)
  h = MatMul (qb, w1)
  hb = Add (h, b1)
  act = Gelu (hb)
  y = MatMul (act, w2)
}
"""


def _model(seed: int = 0) -> ir.Model:
    rng = np.random.default_rng(seed)
    gamma = np.ones(16, np.float32)
    gamma[[3, 11]] = [25.0, -18.0]  # outlier channels in the LayerNorm output
    inits = {
        "gamma": gamma, "beta": rng.normal(0, 0.1, 16).astype(np.float32),
        "wq": rng.normal(0, 0.3, (16, 16)).astype(np.float32), "bq": rng.normal(0, 0.1, 16).astype(np.float32),
        "wk": rng.normal(0, 0.3, (16, 16)).astype(np.float32),
        "w1": rng.normal(0, 0.3, (16, 24)).astype(np.float32), "b1": rng.normal(0, 0.1, 24).astype(np.float32),
        "w2": rng.normal(0, 0.3, (24, 16)).astype(np.float32),
    }
    proto = onnx.parser.parse_model(GRAPH)
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in inits.items())
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def _data(model, n=64, seed=1):
    x = np.random.default_rng(seed).normal(0, 1, (n, 16)).astype(np.float32)
    return as_calibration_data({"x": x}, model), x


def test_fold_is_exact_in_onnxruntime():
    model = _model()
    before = ir.from_proto(ir.to_proto(model))
    data, x = _data(model)
    result = Smooth(data, A8, W8, alpha=0.5)(model)
    assert result.modified
    sites = {e["site"]: e for e in model.meta[REPORT_KEY]["sites"]}
    assert sites["ln"]["status"] == "smoothed" and sites["ln"]["fold"] == "norm"
    assert sites["qb"]["status"] == "smoothed" and sites["qb"]["fold"] == "linear"
    assert sites["act"]["status"] == "skipped" and "Gelu" in sites["act"]["reason"]
    # the residual Add gets the LayerNorm's output back through one Mul
    add = next(n for n in model.graph if n.outputs[0].name == "z")
    assert add.inputs[0].producer().op_type == "Mul"
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    feeds = {"x": np.random.default_rng(7).normal(0, 1, (32, 16)).astype(np.float32)}
    for ref, got in zip(ort_run(before, feeds), ort_run(model, feeds)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    # the LayerNorm's output itself did change: its outlier channels were divided down
    ln_ratio = sites["ln"]["x_ratio_after"] / sites["ln"]["x_ratio_before"]
    assert ln_ratio < 0.5


def _fq_act_uint8(x):
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255.0
    zp = np.clip(np.rint(-lo / scale), 0, 255)
    return (np.clip(np.rint(x / scale) + zp, 0, 255) - zp) * scale


def _fq_w_int8(w):  # per output channel (column), absmax, round to nearest
    scale = np.abs(w).max(axis=0) / 127.0
    return np.clip(np.rint(w / scale), -127, 127) * scale


def _error(x, w, s):
    ref = x.astype(np.float64) @ w
    got = _fq_act_uint8(x / s) @ _fq_w_int8(w * s[:, None])
    return float(((got - ref) ** 2).sum() / (ref ** 2).sum())


def test_alpha_search_beats_alpha_zero_and_no_smoothing():
    proto = onnx.parser.parse_model("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N, 16] x) => (float[N, 16] y) { ln = LayerNormalization <axis = -1> (x, gamma, beta)  y = MatMul (ln, w) }
    """)
    rng = np.random.default_rng(3)
    gamma = np.ones(16, np.float32)
    gamma[[2, 9]] = [40.0, 30.0]
    w = rng.normal(0, 0.2, (16, 16)).astype(np.float32)
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(gamma, "gamma"),
                                    onnx.numpy_helper.from_array(np.zeros(16, np.float32), "beta"),
                                    onnx.numpy_helper.from_array(w, "w")])
    model = ir.from_proto(proto)
    data, x = _data(model, n=256)
    ln = ort_run(ir.from_proto(proto), {"x": x})  # y only; recompute the LayerNorm output in numpy
    xn = (x - x.mean(axis=1, keepdims=True)) / np.sqrt(x.var(axis=1, keepdims=True) + 1e-5) * gamma
    np.testing.assert_allclose(xn @ w, ln[0], rtol=1e-4, atol=1e-4)
    Smooth(data, A8, W8)(model)
    entry = model.meta[REPORT_KEY]["sites"][0]
    assert entry["status"] == "smoothed" and entry["alpha"] > 0
    new_w = ir.to_proto(model).graph.initializer
    w_smoothed = next(onnx.numpy_helper.to_array(t) for t in new_w if t.name.startswith("w_smoothed"))
    s = (w_smoothed / w)[:, 0]  # row j of W was multiplied by s_j
    x_abs = np.abs(xn).max(axis=0)
    s0 = smoothing_scales(x_abs, np.abs(w).max(axis=1), 0.0)
    chosen, at_zero, none = _error(xn, w, s), _error(xn, w, s0), _error(xn, w, np.ones(16))
    assert chosen < at_zero and chosen < 0.5 * none, (chosen, at_zero, none)


def test_skips_graph_inputs_and_validates_alpha():
    proto = onnx.parser.parse_model("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N, 16] x) => (float[N, 16] y) { y = MatMul (x, w) }
    """)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.eye(16, dtype=np.float32), "w"))
    model = ir.from_proto(proto)
    data, _ = _data(model)
    assert not Smooth(data, A8, W8)(model).modified
    (entry,) = model.meta[REPORT_KEY]["sites"]
    assert entry["status"] == "skipped" and "graph input" in entry["reason"]
    with pytest.raises(PassError):
        Smooth(data, A8, W8, alpha=1.5)
