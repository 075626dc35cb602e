"""MLIR output through torch-mlir (lpcompile.backends.mlir, `--emit mlir`): the emitted module is
lowered to LLVM and run by MLIR's ExecutionEngine against onnxruntime on the same QDQ model."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest

pytest.importorskip("torch_mlir")

import lpcompile  # noqa: E402
from lpcompile.backends.mlir import LinalgRunner, dequantize_as_arithmetic  # noqa: E402
from lpcompile.backends.onnx import portable  # noqa: E402
from lpcompile.errors import LpcompileError  # noqa: E402
from tests.conftest import REPO_ROOT, ort_run  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "examples"))
from tiny_model import calibration, mlp_model  # noqa: E402


@pytest.mark.parametrize("fmt, rewritten", [
    ("w8a16", {"per-channel int8 weights": 2}),
    ("int8", {"per-channel int8 weights": 2}),  # + uint8 activation Q/DQ, which torch-mlir lowers itself
    ("int4", {"blocked (one block) int4 weights": 1, "blocked int4 weights": 1}),  # K = 64 < 128: one block
    pytest.param("w4a8", None, marks=pytest.mark.slow),  # per-token activations as arithmetic (portable form)
])
def test_emitted_mlir_runs_like_onnxruntime(fmt, rewritten, tmp_path):
    art = lpcompile.compile(mlp_model(), format=fmt, calibration=[calibration()], emit=("onnx", "mlir"))
    art.save(tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())["mlir"]
    assert report["files"] == ["model.torch.mlir", "model.linalg.mlir"] and report["not_written"] == {}
    if rewritten is not None:
        assert report["weights_as_arithmetic"] == rewritten
    linalg = (tmp_path / "out" / "model.linalg.mlir").read_text()
    assert "xi8>" in linalg and "torch." not in linalg  # 8-bit codes kept; nothing left in the torch dialect
    path = tmp_path / "out" / "model.qdq.onnx"
    x = np.random.default_rng(9).standard_normal((16, 64)).astype(np.float32)  # the batch dim is dynamic
    (ref,) = ort_run(str(path), {"x": x})
    (y,) = LinalgRunner(onnx.load(path))(x)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_arithmetic_form_is_the_dequantization():
    art = lpcompile.compile(mlp_model(), format="int4", calibration=[calibration()])
    qdq = lpcompile.ir.to_proto(portable(art.qdq_model)[0])
    arith, done = dequantize_as_arithmetic(qdq)
    assert sum(done.values()) == 2 and not any(n.op_type == "DequantizeLinear" for n in arith.graph.node)
    x = calibration()["x"]
    np.testing.assert_array_equal(ort_run(arith, {"x": x})[0], ort_run(qdq, {"x": x})[0])


def test_fp8_is_refused_in_one_line_and_the_qdq_model_kept(tmp_path):
    """torch-mlir 20261001 has no conversion for a saturating Cast to float8 (the portable form of
    FP8 activations): the run fails naming it, and the QDQ model is still written."""
    art = lpcompile.compile(mlp_model(), format="fp8", calibration=[calibration()], emit=("onnx", "mlir"))
    with pytest.raises(LpcompileError, match=r"torch-mlir cannot lower the model to the torch dialect: .*onnx.Cast") as e:
        art.save(tmp_path / "out")
    assert "\n" not in str(e.value)
    assert (tmp_path / "out" / "model.qdq.onnx").exists()


from tests.test_extras import _one_line, without_extras  # noqa: E402,F401 (a fixture: optional packages hidden)


def test_emit_mlir_without_torch_mlir_names_the_extra_before_any_work(without_extras):  # noqa: F811
    d, run = without_extras
    r, imports = run("{d}/mlp.onnx", "--emit", "onnx,mlir", "-o", "{d}/out_mlir", "-q")
    assert r.returncode == 2
    assert _one_line(r) == "lpcompile: error: --emit mlir needs torch-mlir: pip install 'lpcompile[mlir]'"
    assert not (d / "out_mlir").exists() and imports == []
