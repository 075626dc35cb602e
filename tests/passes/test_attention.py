"""Activation x activation matmuls quantized (issue 11 item 3): attention scores and context get
static per-tensor Q/DQ on both inputs; onnxruntime runs the QDQ model; the TVM artifact multiplies
int8 codes (int8 x int8 -> int32) and equals onnxruntime on the same file; fp8 runs emulated and
the manifest says so."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

import lpcompile  # noqa: E402
from lpcompile.calibration_data import as_calibration_data  # noqa: E402
from lpcompile.metrics import sqnr_db  # noqa: E402
from lpcompile.passes.attention import QuantizeAttention, activation_matmuls  # noqa: E402
from tests.conftest import REPO_ROOT, mlp_model, ort_run  # noqa: E402


@pytest.fixture(scope="module")
def block():
    from tests.backends.test_dynamic_decoders import AttentionBlock

    torch.manual_seed(0)
    model = lpcompile.capture(AttentionBlock().eval(), (torch.randn(2, 8, 64),), dynamic=["batch", "seq"])
    name = model.graph.inputs[0].name
    cal = {name: np.random.default_rng(0).standard_normal((32, 8, 64)).astype(np.float32)}
    return model, name, cal


def test_only_activation_matmuls_are_found(block):
    model, _, _ = block
    assert len(activation_matmuls(model.graph)) == 2  # scores and context
    assert activation_matmuls(mlp_model().graph) == []  # constant weights: linear layers, not these


def test_qdq_scales_cover_the_calibration_range_and_onnxruntime_runs_it(block):
    model, name, cal = block
    q = model.clone()
    QuantizeAttention(as_calibration_data(cal, model), "int8")(q)
    records = q.meta["lpcompile.quantize_attention"]["matmuls"]
    assert len(records) == 2
    for r in records:
        for inp in r["inputs"].values():
            assert inp["scale"] == pytest.approx(inp["absmax"] / 127, rel=1e-6)
    x = {name: cal[name][:8]}
    ref, got = ort_run(model, x)[0], ort_run(q, x)[0]
    assert sqnr_db(ref, got) > 25  # measured 38.9 dB with float layers
    assert len([n for n in q.graph if n.op_type == "QuantizeLinear"]) == 4


def test_int8_attention_runs_on_int8_codes_in_tvm_and_equals_onnxruntime(block, tmp_path):
    pytest.importorskip("tvm")
    from lpcompile import runtime

    model, name, cal = block
    c = lpcompile.compile(model, format="int8", calibration=cal, quantize_attention="int8", emit=("onnx", "tvm"),
                          rotate="off")
    c.save(tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    attention = [l for l in manifest["layers"] if l["activation_format"] == "int8:tensor:sym"]
    assert len(attention) == 2 and all(l["status"] == "native" for l in attention), attention
    assert all(l["status"] == "native" for l in manifest["layers"])
    assert {l["name"] for l in c.report["layers"]} >= {l["name"] for l in attention}  # measured in the report
    art = runtime.load(tmp_path / "out")
    rng = np.random.default_rng(1)
    for batch, length in ((2, 5), (3, 11)):
        x = {name: rng.standard_normal((batch, length, 64)).astype(np.float32)}
        got = art.run(x)[art.output_names[0]]
        ref = ort_run(onnx.load(tmp_path / "out" / "model.qdq.onnx"), x)[0]
        np.testing.assert_allclose(got, ref, atol=1e-5 * float(np.abs(ref).max()), rtol=0)


@pytest.mark.slow
def test_fp8_attention_is_emulated_and_says_so(block, tmp_path):
    pytest.importorskip("tvm")
    from lpcompile import runtime

    model, name, cal = block
    lpcompile.compile(model, format="int8", calibration=cal, quantize_attention="fp8", emit=("onnx", "tvm"),
                      rotate="off").save(tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    attention = [l for l in manifest["layers"] if l["activation_format"].startswith("fp8_e4m3")]
    assert len(attention) == 2 and all(l["status"] == "emulated" and "float" in l["reason"] for l in attention)
    art = runtime.load(tmp_path / "out")
    x = {name: np.random.default_rng(2).standard_normal((2, 7, 64)).astype(np.float32)}
    ref = ort_run(onnx.load(tmp_path / "out" / "model.qdq.onnx"), x)[0]
    np.testing.assert_allclose(art.run(x)[art.output_names[0]], ref, atol=1e-5 * float(np.abs(ref).max()), rtol=0)


@pytest.mark.parametrize("args, message", [
    (["--format", "auto", "--budget", "6", "--calibration", "random:8", "--quantize-attention", "int8"], "not format auto"),
    (["--format", "int8", "--quantize-attention", "int8"], "needs calibration"),
    (["--format", "int4", "--quantize-attention", "int2"], "invalid choice"),
])
def test_bad_quantize_attention_is_one_line(tmp_path, args, message):
    import onnx_ir as ir

    ir.save(mlp_model(), tmp_path / "mlp.onnx")
    r = subprocess.run([sys.executable, "-m", "lpcompile", str(tmp_path / "mlp.onnx"), *args, "--emit", "onnx",
                        "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert message in lines[-1], r.stderr
    assert not (tmp_path / "out").exists()
