"""The Python API: capture from every source, compile, run, save."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

import lpcompile
from lpcompile.errors import ModelError
from lpcompile.report import to_markdown
from models.llama import LlamaConfig, build_llama
from models.small import build_cnn, build_mlp
from tests.conftest import mlp_model, ort_run, sqnr_db

torch.set_num_threads(1)


def test_capture_torch_module_with_dynamic_batch_matches_torch():
    module = build_mlp().eval()
    x = torch.randn(4, 64)
    model = lpcompile.capture(module, (x,), dynamic=["batch"])
    assert model.graph.inputs[0].shape[0] != 4  # symbolic
    x2 = torch.randn(7, 64)
    got = ort_run(model, {model.graph.inputs[0].name: x2.numpy()})[0]
    np.testing.assert_allclose(got, module(x2).detach().numpy(), rtol=1e-5, atol=1e-5)
    kinds = [n.metadata_props.get("lpcompile.pattern") for n in model.graph]
    assert kinds.count("linear:gemm") == 3


def test_compile_torch_llama_and_cnn(tmp_path):
    llama = build_llama(LlamaConfig.tiny()).eval()
    ids = torch.randint(0, 512, (2, 16))
    calib = [{"input_ids": np.random.default_rng(i).integers(0, 512, (4, 16)).astype(np.int64)} for i in range(4)]
    art = lpcompile.compile(llama, format="w4a8", example_inputs=(ids,), calibration=calib)
    ref = llama(ids).detach().numpy()
    (got,) = art.run({"input_ids": ids}).values()
    assert sqnr_db(ref, got) > 10.0
    names = {l["name"] for l in art.report["layers"]}
    assert any("q_proj" in n for n in names) and any("down" in n for n in names), names
    cnn = build_cnn().eval()
    x = torch.randn(2, 3, 32, 32)
    art = lpcompile.compile(cnn, format="int8", example_inputs=(x,),
                            calibration=[{"x": np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)}])
    assert art.report["totals"]["layers_quantized"] >= 1
    art.save(tmp_path / "cnn.lpc")
    assert (tmp_path / "cnn.lpc" / "model.qdq.onnx").exists()


def test_modelproto_and_external_data_inputs(tmp_path):
    proto = ir.to_proto(mlp_model())
    art = lpcompile.compile(proto, format="w8a16")
    assert art.report["totals"]["layers_quantized"] == 3
    assert art.report["totals"]["output_sqnr_db"] is None  # no data: nothing measured, and it says so
    onnx.save_model(proto, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    art = lpcompile.compile(tmp_path / "ext.onnx", format="int4", calibration="random:4")
    x = {"x": np.random.default_rng(0).standard_normal((2, 8, 256)).astype(np.float32)}
    assert sqnr_db(ort_run(mlp_model(), x)[0], art.run(x)["y"]) > 10


def test_capture_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(ModelError, match="example_inputs"):
        lpcompile.capture(build_mlp())
    with pytest.raises(ModelError, match="no such file"):
        lpcompile.capture(tmp_path / "none.onnx")
    with pytest.raises(ModelError, match="cannot read a model"):
        lpcompile.capture(42)


def test_report_shows_rotation_and_outliers_before_and_after(tmp_path):
    """With calibration data, compile() has the rotate pass measure every linear input's kurtosis
    and max/median channel ratio before and after rotating; report.json and report.md show them.
    Planted outlier channels in the input: the rotated input of the first layer must be flatter."""
    rng = np.random.default_rng(0)
    calib = []
    for i in range(4):
        x = rng.standard_normal((4, 8, 256)).astype(np.float32)
        x[..., [3, 77]] *= 40.0  # two outlier channels
        calib.append({"x": x})
    art = lpcompile.compile(mlp_model(), format="int4", rotate="online", calibration=calib)
    rot = art.report["rotate"]
    assert {o["status"] for o in rot["online"]} == {"online"}
    outliers = rot["outliers"]
    assert set(outliers) == {"w1", "w2", "w3"}
    w1 = outliers["w1"]
    assert w1["before"]["kurtosis"] > 20 and w1["after"]["kurtosis"] < 4, w1
    assert w1["before"]["max_to_median"] > 10 * w1["after"]["max_to_median"], w1
    out = art.save(tmp_path / "rot.lpc")
    saved = json.loads((out / "report.json").read_text())
    assert saved["rotate"]["outliers"]["w1"] == w1
    md = (out / "report.md").read_text()
    assert "## Rotation" in md and "| online | x | w1 | online | H256 = sylvester(256) with random signs |" in md
    b, a = w1["before"], w1["after"]
    assert f"| w1 | {b['kurtosis']:.1f} → {a['kurtosis']:.1f} | {b['max_to_median']:.1f} → {a['max_to_median']:.1f} |" in md

    plain = lpcompile.compile(mlp_model(), format="w8a16", rotate="online")  # no data: nothing measured
    assert "outliers" not in plain.report["rotate"]
    assert "not measured (no calibration data)" in to_markdown(plain.report)
