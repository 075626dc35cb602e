"""ONNX's own backend node tests for QuantizeLinear / DequantizeLinear (the cases shipped with the
installed `onnx`: uint8/int8/int16 with axes and blocks, int4/uint4, float8 E4M3/E5M2) compiled
through lpcompile's TVM lowering and run on the CPU. Scales and zero points are run-time inputs
there, so these exercise the general elementwise Q/DQ kernels, not only the fused linear layers.

4-bit tensors cross the TVM boundary one code per byte (int8 / uint8), as in the artifact runtime;
the outputs are compared bit for bit with the expected ones of the test case."""

from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import onnx
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

from lpcompile.backends.tvm.lower import compile_model  # noqa: E402
from lpcompile.backends.tvm.target import host_target  # noqa: E402
from lpcompile.errors import TargetError  # noqa: E402

# int2 / uint2 / float4 are not lpcompile formats (refused with a clear error, checked below)
UNSUPPORTED = ("int2", "uint2", "float4e2m1")


def _cases():
    from onnx.backend.test.case import node

    with warnings.catch_warnings():  # other ops' case generators warn about their own data
        warnings.simplefilter("ignore")
        cases = node.collect_testcases(None)
    return {c.name: c for c in cases if c.name.startswith(("test_quantizelinear", "test_dequantizelinear"))}


CASES = _cases()
SUPPORTED = sorted(n for n in CASES if not n.endswith(UNSUPPORTED))
TARGET = host_target()


def _to_tvm(value: np.ndarray) -> tvm.runtime.Tensor:
    if value.dtype in (ml_dtypes.int4, ml_dtypes.uint4):  # one code per byte
        value = value.astype(np.int8 if value.dtype == ml_dtypes.int4 else np.uint8)
    return tvm.runtime.tensor(value.copy(order="C"))  # (ascontiguousarray makes 0-d arrays 1-d)


def _from_tvm(t: tvm.runtime.Tensor, elem_type: int) -> np.ndarray:
    arr = t.numpy()
    np_type = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    return arr.astype(np_type) if arr.dtype != np_type else arr


def _as_array(v) -> np.ndarray:
    return onnx.numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto) else np.asarray(v)


def _bits(a: np.ndarray) -> np.ndarray:
    """Bit patterns (exact equality, NaNs included); 4-bit codes by value."""
    if a.dtype in (ml_dtypes.int4, ml_dtypes.uint4):
        return a.astype(np.int8)
    return a.view(np.uint8) if a.dtype.itemsize == 1 else a.view(f"u{a.dtype.itemsize}")


def test_the_installed_onnx_ships_the_low_bit_cases():
    for name in ("test_dequantizelinear_int4", "test_dequantizelinear_uint4", "test_dequantizelinear_e4m3fn",
                 "test_dequantizelinear_e5m2", "test_quantizelinear_int4", "test_quantizelinear_uint4",
                 "test_quantizelinear_e4m3fn", "test_quantizelinear_e5m2", "test_dequantizelinear_blocked"):
        assert name in CASES, name


@pytest.mark.parametrize("name", SUPPORTED)
def test_node_case_through_tvm(name):
    case = CASES[name]
    model = case.model
    ex, report = compile_model(model, TARGET)
    assert any(k.endswith("elementwise]") for k in report.fired), report.fired  # our kernel, not TVM's stock one
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out_types = [o.type.tensor_type.elem_type for o in model.graph.output]
    for inputs, expected in case.data_sets:
        got = vm["main"](*[_to_tvm(_as_array(v)) for v in inputs])
        got = [got] if isinstance(got, tvm.runtime.Tensor) else list(got)
        for g, e, t in zip(got, expected, out_types):
            g, e = _from_tvm(g, t), _as_array(e)
            assert g.dtype == e.dtype and g.shape == e.shape, (g.dtype, e.dtype, g.shape, e.shape)
            np.testing.assert_array_equal(_bits(g), _bits(e), err_msg=name)


@pytest.mark.parametrize("name", sorted(n for n in CASES if n.endswith(UNSUPPORTED)))
def test_formats_lpcompile_does_not_have_are_refused(name):
    with pytest.raises(TargetError, match=r"no (Quantize|Dequantize)Linear kernel for (u?int2|float4_e2m1fn)"):
        compile_model(CASES[name].model, TARGET)
