"""A model whose weights are external data (its own .data file, and the spill file compile uses
for large models) builds with TVM: the importer used to look for the files in the working
directory ("Data of TensorProto (b1) should be stored in mlp.onnx.data, but it is not regular
file"), which failed the decode benchmark's 166 M LLaMA."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("tvm")

import lpcompile  # noqa: E402
import lpcompile.api as api  # noqa: E402
from lpcompile import runtime  # noqa: E402
from tests.conftest import mlp_model, ort_run  # noqa: E402


def test_external_and_spilled_weights_reach_the_tvm_build(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    ir.save(mlp_model(), src / "mlp.onnx", external_data="mlp.onnx.data", size_threshold_bytes=0)
    monkeypatch.setattr(api, "SPILL_MODEL_BYTES", 0)  # every new tensor goes to the spill file too
    monkeypatch.chdir(tmp_path)  # neither file is where the working directory would find it
    x = {"x": np.random.default_rng(0).standard_normal((8, 8, 256)).astype(np.float32)}
    out = tmp_path / "out"
    lpcompile.compile(str(src / "mlp.onnx"), format="int4", calibration=x, emit=("onnx", "tvm"),
                      rotate="off").save(out)
    model = runtime.load(out)
    got = model.run(x)[model.output_names[0]]
    ref = ort_run(ir.load(out / "model.qdq.onnx"), x)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
