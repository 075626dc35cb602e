"""lpcompile's lowering as Relax passes in a TVM user's own flow (lpcompile.integrations.tvm):
a QDQ model lpcompile wrote, imported by TVM's own ONNX importer (or lpcompile's, for the
recipes TVM's refuses), built by `tvm.compile` with the passes, against onnxruntime on the same
file (optimizations off: the reference)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402
from tvm.relax.frontend import onnx as relax_onnx  # noqa: E402

import lpcompile  # noqa: E402
import lpcompile.integrations.tvm as lpt  # noqa: E402
from tests.conftest import ort_run  # noqa: E402

K, H, N, ROWS = 64, 128, 32, 4


def mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.1).astype(np.float32), n)
             for n, s in (("w1", (K, H)), ("b1", (H,)), ("w2", (H, N)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Add", ["h", "b1"], ["h2"], name="add"),
             helper.make_node("Relu", ["h2"], ["r"], name="relu"), helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def qdq_file(fmt: str, tmp_path) -> str:
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((ROWS, K)).astype(np.float32)} for _ in range(4)]
    lpcompile.compile(mlp(), format=fmt, calibration=calib).save(tmp_path / fmt)
    return str(tmp_path / fmt / "model.qdq.onnx")


def run_vm(ex, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def kernels(mod) -> list[str]:
    return sorted(gv.name_hint for gv in mod.functions if gv.name_hint.startswith("lp_matmul"))


@pytest.mark.parametrize("fmt, fired", [("w8a16", "R.matmul[float32 x int8]"), ("int8", "R.matmul[uint8 x int8]")])
def test_stock_importer_then_lpcompile_passes(fmt, fired, tmp_path):
    path = qdq_file(fmt, tmp_path)
    target = lpt.host_target()
    mod = relax_onnx.from_onnx(onnx.load(path))  # the user's import: TVM's own ONNX frontend
    lowered = lpt.lower_qdq(target)(mod)
    assert len(kernels(lowered)) >= 1 and lpt.last_report().fired[fired] == 2
    assert not any(gv.name_hint.startswith("lp_") for gv in mod.functions)  # a pass: the input is not touched
    ex = tvm.compile(mod, target, relax_pipeline=lpt.passes(target))
    x = np.random.default_rng(2).standard_normal((ROWS, K)).astype(np.float32)
    (ref,) = ort_run(path, {"x": x})
    np.testing.assert_allclose(run_vm(ex, x), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_lower_qdq_inside_a_users_sequential(tmp_path):
    """An MLC-style flow: the user's own pass list with lower_qdq in it, TVM's default build."""
    path = qdq_file("w8a16", tmp_path)
    target = lpt.host_target()
    mod = relax_onnx.from_onnx(onnx.load(path))
    mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(), lpt.lower_qdq(target),
                                    relax.transform.DeadCodeElimination()])(mod)
    assert len(kernels(mod)) == 2  # one kernel per layer shape ([64, 128], [128, 32])
    ex = tvm.compile(mod, target)
    x = np.random.default_rng(3).standard_normal((ROWS, K)).astype(np.float32)
    (ref,) = ort_run(path, {"x": x})
    np.testing.assert_allclose(run_vm(ex, x), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_int4_through_lpcompile_importer_and_passes(tmp_path):
    """TVM's importer refuses int4 Q/DQ; lpt.from_onnx imports it with the kernels in the module."""
    path = qdq_file("int4", tmp_path)
    target = lpt.host_target()
    with pytest.raises(Exception):  # noqa: B017 (TVM 0.27: "initializer size mismatch" / "unsupported dtype")
        relax_onnx.from_onnx(onnx.load(path))
    mod = lpt.from_onnx(path, target)
    assert len(kernels(mod)) == 2 and lpt.last_report().fired["MatMul[float32 x int4]"] == 2
    ex = tvm.compile(mod, target, relax_pipeline=lpt.passes(target))
    x = np.random.default_rng(4).standard_normal((ROWS, K)).astype(np.float32)
    (ref,) = ort_run(path, {"x": x})
    np.testing.assert_allclose(run_vm(ex, x), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
