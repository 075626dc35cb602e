"""awq: activation-aware scaling lowers a layer's int4 output error below plain rounding on a layer
with salient input channels, the fold stays exact in onnxruntime, and clipping each group by its
output error (ΔwᵀHΔw) beats clipping by the weight error; both measured with numpy references."""

import numpy as np
import onnx
import onnx_ir as ir

from lpcompile.calibration_data import as_calibration_data
from lpcompile.formats import QuantSpec
from lpcompile.passes.awq import REPORT_KEY, AwqScale, output_error_scales
from lpcompile.passes.weight_quant import expand_groups, find_scales, quantize_weight
from tests.conftest import ort_run

W4 = QuantSpec.parse("int4:block(0,32):sym")
D = 64


def _int4_block32(w):  # numpy reference: symmetric int4 per block of 32 input rows, absmax, nearest
    k, n = w.shape
    g = w.reshape(k // 32, 32, n)
    scale = np.abs(g).max(axis=1, keepdims=True) / 7.0
    return (np.clip(np.rint(g / scale), -8, 7) * scale).reshape(k, n)


def _model_with_salient_channels(seed=0):
    proto = onnx.parser.parse_model(f"""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[N, {D}] x) => (float[N, {D}] y, float[N, {D}] z)
    {{ ln = LayerNormalization <axis = -1> (x, gamma, beta)  y = MatMul (ln, w)  z = Add (ln, x) }}
    """)
    rng = np.random.default_rng(seed)
    gamma = np.full(D, 0.5, np.float32)
    gamma[[5, 40]] = [12.0, 9.0]  # salient input channels: most of the activation energy
    w = rng.normal(0, 0.2, (D, D)).astype(np.float32)
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(gamma, "gamma"),
                                    onnx.numpy_helper.from_array(np.zeros(D, np.float32), "beta"),
                                    onnx.numpy_helper.from_array(w, "w")])
    return proto, w, gamma


def test_activation_aware_scaling_lowers_output_error():
    proto, w, gamma = _model_with_salient_channels()
    model = ir.from_proto(proto)
    x = np.random.default_rng(1).normal(0, 1, (256, D)).astype(np.float32)
    result = AwqScale(as_calibration_data({"x": x}, model), None, W4)(model)
    assert result.modified
    (entry,) = [e for e in model.meta[REPORT_KEY]["sites"] if e["site"] == "ln"]
    assert entry["status"] == "smoothed" and entry["error_after"] < entry["error_before"]
    # exact in float (the residual Add gets the LayerNorm's output back)
    feeds = {"x": np.random.default_rng(2).normal(0, 1, (16, D)).astype(np.float32)}
    for ref, got in zip(ort_run(ir.from_proto(proto), feeds), ort_run(model, feeds)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    # numpy reference on fresh rows: X·W against (X/s)·Q(s·W) and X·Q(W)
    w_new = next(onnx.numpy_helper.to_array(t) for t in ir.to_proto(model).graph.initializer
                 if t.name.startswith("w_smoothed"))
    s = (w_new / w)[:, 0]
    xt = np.random.default_rng(3).normal(0, 1, (512, D))
    xn = (xt - xt.mean(1, keepdims=True)) / np.sqrt(xt.var(1, keepdims=True) + 1e-5) * gamma
    ref = xn @ w
    plain = ((xn @ _int4_block32(w) - ref) ** 2).sum()
    scaled = (((xn / s) @ _int4_block32(w * s[:, None]) - ref) ** 2).sum()
    assert scaled < 0.5 * plain, (scaled, plain)


def test_output_error_clipping_beats_weight_error_clipping():
    rng = np.random.default_rng(4)
    k, n = 128, 48
    mix = rng.normal(0, 1, (k, k)) * (rng.random((k, k)) < 0.05) + np.eye(k) * 0.3
    x = rng.normal(0, 1, (2048, k)) @ mix  # correlated inputs
    x[:, :4] *= 6.0
    h = x.T @ x
    w = rng.standard_t(3, (k, n)) * 0.1  # heavy tails: clipping matters
    spec = QuantSpec.parse("int4:block(0,32):sym")

    def out_err(scale):
        full = expand_groups(scale, spec, (k, n))
        deq = np.clip(np.rint(w / full), -8, 7) * full
        d = deq - w
        return float(np.einsum("in,in->", h @ d, d))

    s_out, _ = output_error_scales(w, spec, h)
    s_weight, _ = find_scales(w.astype(np.float32), spec, clip_search=True, importance=np.diag(h).copy())
    s_none, _ = find_scales(w.astype(np.float32), spec, clip_search=False)
    assert out_err(s_out) < 0.97 * out_err(s_weight) and out_err(s_weight) <= out_err(s_none) * 1.0001
    # as a weight method: GPTQ with these scales lowers the output error below plain GPTQ here
    q_clip = quantize_weight(w.astype(np.float32), spec, "gptq-clip", h)
    q_gptq = quantize_weight(w.astype(np.float32), spec, "gptq", h)
    err = lambda q: float(((x @ (q.dequantize() - w)) ** 2).sum())  # noqa: E731
    assert err(q_clip) < err(q_gptq)
