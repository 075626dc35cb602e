"""lpcompile's CPU relax pipeline (`backends/tvm/pipeline.py`) on float ops it schedules itself."""

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from lpcompile.backends.tvm import pipeline  # noqa: E402
from lpcompile.backends.tvm.target import host_target  # noqa: E402


def _matmul_module(m, k: int, n: int) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([m, k], "float32"))
    w = relax.Var("w", relax.TensorType([k, n], "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.matmul(x, w))
        bb.emit_func_output(y)
    return bb.get()


@pytest.mark.parametrize("m,k,n", [(1, 1024, 1024), (1, 384, 1536), (1, 100, 48), (1, 64, 40), (3, 64, 64),
                                   (None, 384, 1536)])
def test_float_matmul_matches_numpy(m, k, n):
    """Static single rows take the GEMV path (vectors of outputs in parallel, each down k, summed
    in registers); other shapes the matmul path; all must equal numpy's product to fp32 rounding."""
    rows = 2 if m is None else m
    mod = _matmul_module(tvm.tirx.Var("m", "int64") if m is None else m, k, n)
    vm = relax.VirtualMachine(pipeline.build(mod, host_target()), tvm.cpu())
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((rows, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()
    ref = x.astype(np.float64) @ w
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max() * np.sqrt(k)


def test_static_single_row_matmul_is_parallel_and_vectorized():
    """One output row: its unit loop is dropped, and the matmul rule (parallel over rows) would
    leave one thread walking W a column at a time; the GEMV path splits the outputs instead."""
    mod = relax.transform.LegalizeOps()(_matmul_module(1, 1024, 1024))
    (gv, func), = [(g, f) for g, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    sch = pipeline.CpuFallback().apply(func, host_target(), False)
    text = sch.mod["main"].script()
    assert "T.parallel" in text and "T.vectorized" in text and '"local"' in text


def test_an_unexpected_tvm_pipeline_is_a_named_error(monkeypatch):
    """The CPU pipeline replaces the first pass of TVM 0.27's legalization; a TVM whose order
    differs is refused with BackendError (a real error, not an assert that python -O strips)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from lpcompile.errors import BackendError

    stock = cpu.legalize_passes
    monkeypatch.setattr(cpu, "legalize_passes", lambda target: stock(target)[::-1])
    with pytest.raises(BackendError, match="LegalizeOps"):
        pipeline.cpu_pipeline(host_target())(_matmul_module(1, 64, 64))


def test_depthwise_conv_over_1x1_map():
    """A 7x7 depthwise conv over a 1x1 map at batch 1 (ConvNeXt's last stage on small images) is
    GEMV-shaped with no free spatial loop: dlight's GEMV rule asserted on it; it must refuse and
    leave the block to CpuFallback."""
    c = 32
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, c, 1, 1], "float32"))
    w = relax.Var("w", relax.TensorType([c, 1, 7, 7], "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.conv2d(x, w, padding=3, groups=c))
        bb.emit_func_output(y)
    vm = relax.VirtualMachine(pipeline.build(bb.get(), host_target()), tvm.cpu())
    rng = np.random.default_rng(0)
    xs, ws = rng.standard_normal((1, c, 1, 1)).astype(np.float32), rng.standard_normal((c, 1, 7, 7)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(xs), tvm.runtime.tensor(ws)).numpy()
    np.testing.assert_allclose(got, xs * ws[:, :, 3:4, 3:4].reshape(1, c, 1, 1), rtol=1e-6)


def test_shape_computation_fuses_without_var_redefinition(monkeypatch):
    """TVM's own Range over a symbolic scalar computes its length in tensors from shape_to_tensor,
    whose legalized PrimFunc takes the function's symbolic dim as a TIR scalar parameter; fused
    with the arithmetic around it, TVM 0.27's FuseTIR defined that Var twice (`VarRemapGet(source)
    == nullptr`, the failure lpcompile's pipeline had where stock tvm.compile, which does not
    fuse, built). Such PrimFuncs stay unfused; the result equals onnxruntime."""
    import onnx

    from lpcompile.backends.tvm.lower import from_onnx, importer
    from tests.backends.test_dynamic_decoders import RANGES
    from tests.conftest import ort_run

    monkeypatch.delitem(importer.CONVERTERS, "Range")  # TVM's converter: the shape_to_tensor path
    model = onnx.parser.parse_model(RANGES)
    mod, _ = from_onnx(model, host_target())
    vm = relax.VirtualMachine(pipeline.build(mod, host_target()), tvm.cpu())
    for s in (1, 2, 8):
        x = np.zeros((2, s), np.float32)
        for got, ref in zip(vm["main"](tvm.runtime.tensor(x)), ort_run(model, {"x": x})):
            np.testing.assert_array_equal(got.numpy(), ref)
