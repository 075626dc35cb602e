"""TVM kernels against onnxruntime running the equivalent QDQ graph, and CUDA builds with nvcc.

Numerics (CPU): each kernel's output is compared with ORT (optimizations off) on the same ONNX
QDQ graph at rtol 1e-5 / atol 1e-5 of the output's largest magnitude (fp32 summation order is
the only expected difference); quantize kernels match ORT's QuantizeLinear bit for bit and the
integer accumulators match numpy exactly. CUDA: every kernel's generated source compiles with
nvcc for each supported arch (numerics are the shared compute definitions checked here).
"""

from __future__ import annotations

import functools
import os
import shutil

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

from lpcompile.backends.tvm.kernels import (  # noqa: E402
    DOT4,
    NIB8,
    NIBBLE,
    build,
    cuda_binary,
    hadamard_transform,
    onnx_weight_to_kn,
    quantize_rows,
    quantize_tensor,
    quantized_matmul,
)
from lpcompile.backends.tvm.kernels import avx2, cpu, x86  # noqa: E402
from lpcompile.backends.tvm.target import CUDA_ARCHES, cuda_target, host_target  # noqa: E402
from lpcompile.errors import TargetError  # noqa: E402
from tests.conftest import ort_run  # noqa: E402

SHAPES = [(m, k, n) for m in (1, 7, 32) for k in (256, 384) for n in (64, 96)]
RAGGED = (5, 200, 100)  # K not a multiple of the 128 block, N not a multiple of the tile
NP = {
    "int4": ml_dtypes.int4,
    "int8": np.int8,
    "uint8": np.uint8,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
}
FP8_MAX = {"float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}
TARGET = host_target()


def assert_close(got: np.ndarray, ref: np.ndarray, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """|got - ref| <= rtol * |ref| + atol * max|ref| elementwise."""
    assert got.shape == ref.shape
    bound = rtol * np.abs(ref) + atol * float(np.abs(ref).max())
    err = np.abs(got.astype(np.float64) - ref)
    assert np.all(err <= bound), f"max error {err.max():.3g} (bound {bound.max():.3g}, |ref| {np.abs(ref).max():.3g})"


# --- compiled kernels, cached for the whole module ------------------------------------------------


@functools.cache
def kernel(m: int | None, k: int, n: int, **kw):
    """A compiled quantized_matmul; m=None is symbolic (one build serves every row count)."""
    return build(quantized_matmul(m, k, n, **kw), TARGET)["main"]


@functools.cache
def q_tensor_kernel(k: int, dtype: str):
    return build(quantize_tensor(None, k, dtype), TARGET)["main"]


@functools.cache
def q_rows_kernel(k: int, codes: str = "int8"):
    return build(quantize_rows(None, k, codes), TARGET)["main"]


def rows(m: int) -> int | None:
    """M = 1 uses the GEMV kernel (static), more rows the symbolic-M GEMM kernel."""
    return 1 if m == 1 else None


def run(fn, *arrays, out_shape, out_dtype="float32"):
    out = tvm.runtime.tensor(np.zeros(out_shape, out_dtype))
    fn(*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays], out)
    return out.numpy()


# --- ONNX reference graphs ----------------------------------------------------------------------


def _tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def qdq_linear_model(
    wq: np.ndarray, w_scale: np.ndarray, *, axis: int, block_size: int | None, gemm: bool, act=None
) -> onnx.ModelProto:
    """y = x' @ DQ(wq) (MatMul, W [K, N]) or Gemm(x', DQ(wq), transB=1) (W [N, K]).

    act: None (x' = x), ("static", dtype, scale, zero_point) for a Q -> DQ pair, or
    "per_token" / "per_token_int4" for the `ai.lpcompile.PerTokenQDQ_int8` / `_int4` functions.
    """
    k = wq.shape[1] if gemm else wq.shape[0]
    n = wq.shape[0] if gemm else wq.shape[1]
    inits = [_tensor("wq", wq), _tensor("ws", w_scale)]
    dq_attrs = {"axis": axis} | ({"block_size": block_size} if block_size else {})
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], **dq_attrs)]
    functions, opsets = [], [helper.make_opsetid("", 21)]
    xin = "x"
    if act in ("per_token", "per_token_int4"):
        codes = "int4" if act == "per_token_int4" else "int8"
        nodes.append(helper.make_node(f"PerTokenQDQ_{codes}", ["x"], ["xd"], domain="ai.lpcompile"))
        functions.append(per_token_function(codes))
        opsets.append(helper.make_opsetid("ai.lpcompile", 1))
        xin = "xd"
    elif act is not None:
        _, dtype, sx, zx = act
        inits += [_tensor("sx", np.array(sx, np.float32)), _tensor("zx", np.array(zx, NP[dtype]))]
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        ]
        xin = "xd"
    if gemm:
        nodes.append(helper.make_node("Gemm", [xin, "w"], ["y"], transB=1))
    else:
        nodes.append(helper.make_node("MatMul", [xin, "w"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "qdq_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=opsets, functions=functions, ir_version=10)
    onnx.checker.check_model(model)
    return model


def per_token_function(codes: str = "int8") -> onnx.FunctionProto:
    """Dynamic per-token int8 / int4 Q/DQ as the quantize pass writes it (a model-local function;
    the code type from output_dtype, no zero point)."""

    def const(name, array):
        return helper.make_node("Constant", [], [name], value=_tensor(name + "_v", array))

    qmax, onnx_type = {"int8": (127.0, TensorProto.INT8), "int4": (7.0, TensorProto.INT4)}[codes]
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Flatten", ["x"], ["rows"], axis=-1),
        helper.make_node("Abs", ["rows"], ["abs"]),
        const("axes", np.array([1], np.int64)),
        helper.make_node("ReduceMax", ["abs", "axes"], ["amax"], keepdims=0),
        const("qmax", np.array(qmax, np.float32)),
        helper.make_node("Div", ["amax", "qmax"], ["s0"]),
        const("tiny", np.array(2.0**-24, np.float32)),
        helper.make_node("Max", ["s0", "tiny"], ["scale"]),
        helper.make_node("QuantizeLinear", ["rows", "scale"], ["q"], axis=0, output_dtype=onnx_type),
        helper.make_node("DequantizeLinear", ["q", "scale"], ["dq"], axis=0),
        helper.make_node("Reshape", ["dq", "shape"], ["y"]),
    ]
    return helper.make_function("ai.lpcompile", f"PerTokenQDQ_{codes}", ["x"], ["y"], nodes, [helper.make_opsetid("", 21)])


def quantize_model(k: int, dtype: str, sx: float, zx, dequantize: bool = False) -> onnx.ModelProto:
    """QuantizeLinear alone, or (dequantize) followed by DequantizeLinear: onnxruntime's Python
    API cannot return float8_e5m2 arrays, so fp8 codes are compared through DQ(q) = q * sx."""
    onnx_type = helper.np_dtype_to_tensor_dtype(np.dtype(NP[dtype]))
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["q"])]
    if dequantize:
        nodes.append(helper.make_node("DequantizeLinear", ["q", "sx", "zx"], ["y"]))
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", k]) if dequantize else helper.make_tensor_value_info("q", onnx_type, ["M", k])
    graph = helper.make_graph(
        nodes,
        "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [out],
        initializer=[_tensor("sx", np.array(sx, np.float32)), _tensor("zx", np.array(zx, NP[dtype]))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


# --- random operands ------------------------------------------------------------------------------


def activations(m: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((m, k)).astype(np.float32)


def weights(dtype: str, shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    if dtype == "int4":
        return rng.integers(-8, 8, shape).astype(ml_dtypes.int4)
    if dtype == "int8":
        return rng.integers(-128, 128, shape).astype(np.int8)
    return (rng.standard_normal(shape) * FP8_MAX[dtype] / 8).astype(NP[dtype])


def weight_scales(k: int, n: int, block: int | None, gemm: bool, seed: int) -> tuple[np.ndarray, int]:
    """(ONNX scale tensor, DequantizeLinear axis) for a MatMul [K, N] or Gemm [N, K] weight."""
    rng = np.random.default_rng(seed + 2)
    if block is None:
        return rng.uniform(0.01, 0.05, n).astype(np.float32), 0 if gemm else 1
    nb = -(-k // block)
    s = rng.uniform(0.01, 0.05, (nb, n)).astype(np.float32)
    return (np.ascontiguousarray(s.T), 1) if gemm else (s, 0)


def kernel_weight(wq: np.ndarray, ws: np.ndarray, axis: int, block: int | None, gemm: bool, dtype: str):
    """The ONNX weight repacked into the kernel's layout: (w, w_scale)."""
    q_kn, s, blk = onnx_weight_to_kn(wq, ws, axis=axis, block_size=block, transposed=gemm)
    k_pad = s.shape[0] * blk
    if dtype == "int4":
        return NIBBLE.pack(q_kn.astype(np.int8), k_pad), s
    padded = np.zeros((k_pad, q_kn.shape[1]), q_kn.dtype)
    padded[: q_kn.shape[0]] = q_kn
    return padded, s


# --- weight-only: float activations x quantized weights ---------------------------------------------

WEIGHT_ONLY = [  # (weight dtype, block size or None = per-channel, Gemm transB layout)
    ("int4", 128, False),
    ("int4", 128, True),
    ("int4", None, False),
    ("int8", None, True),
    ("float8_e4m3fn", 128, False),
    ("float8_e4m3fn", None, True),
    ("float8_e5m2", None, False),
]


WEIGHT_ONLY_CASES = [
    (*w, *shape) for w in WEIGHT_ONLY for shape in SHAPES + [RAGGED] if shape != RAGGED or w[1] is not None
] + [  # the ragged case is about a partial last K block, so blocked scales only
    ("int4", 128, gemm, 1, k, n) for gemm in (False, True) for k, n in ((256, 128), (384, 256))
]  # N a multiple of 128: the AVX-512 GEMV kernel on hosts that have it


@pytest.mark.parametrize("dtype,block,gemm,m,k,n", WEIGHT_ONLY_CASES)
def test_weight_only_matches_ort(dtype, block, gemm, m, k, n):
    seed = m * 1000 + k + n
    x = activations(m, k, seed)
    wq = weights(dtype, (n, k) if gemm else (k, n), seed)
    ws, axis = weight_scales(k, n, block, gemm, seed)
    ref = ort_run(qdq_linear_model(wq, ws, axis=axis, block_size=block, gemm=gemm), {"x": x})[0]
    w, s = kernel_weight(wq, ws, axis, block, gemm, dtype)
    fn = kernel(rows(m), k, n, weight=dtype, block_size=block)
    assert_close(run(fn, x, w, s, out_shape=(m, n)), ref)


def test_static_row_count_gemm():
    """A GEMM built for a fixed M (tail row tile partly out of range) matches too."""
    m, k, n = 7, 384, 96
    x = activations(m, k, 3)
    wq = weights("int4", (k, n), 3)
    ws, axis = weight_scales(k, n, 128, False, 3)
    ref = ort_run(qdq_linear_model(wq, ws, axis=axis, block_size=128, gemm=False), {"x": x})[0]
    w, s = kernel_weight(wq, ws, axis, 128, False, "int4")
    assert_close(run(kernel(m, k, n, weight="int4", block_size=128), x, w, s, out_shape=(m, n)), ref)


has_avx512 = pytest.mark.skipif(
    not tvm.target.codegen.target_has_features("avx512f", TARGET), reason="host CPU without AVX-512"
)


@has_avx512
@pytest.mark.parametrize("k,n,block", [(256, 128, 128), (384, 256, 128), (256, 256, None)])
def test_avx512_int4_gemv_is_the_compute_definition(k, n, block):
    """The hand-scheduled GEMV is bit-identical to the generic schedule of the shared compute."""
    from lpcompile.backends.tvm.kernels import cpu

    func = quantized_matmul(1, k, n, weight="int4", block_size=block)
    special = cpu.schedule(func, TARGET)
    assert "permvar" in special.script()  # the specialisation applied
    generic = tvm.compile(tvm.IRModule({"main": cpu.schedule(func, TARGET, generic_only=True)}), target=TARGET)["main"]
    fast = tvm.compile(tvm.IRModule({"main": special}), target=TARGET)["main"]
    x = activations(1, k, 7)
    wq = weights("int4", (k, n), 7)
    ws, axis = weight_scales(k, n, block, False, 7)
    w, s = kernel_weight(wq, ws, axis, block, False, "int4")
    a, b = run(generic, x, w, s, out_shape=(1, n)), run(fast, x, w, s, out_shape=(1, n))
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


# --- static int8 x int8 -----------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["int8", "uint8"])
@pytest.mark.parametrize("zx", [0, 3])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_static_matches_ort(m, k, n, zx, act):
    """W8A8 static: int8 (symmetric or with a zero point) or uint8 asymmetric activations (the
    int8 recipe's) times per-channel int8 weights, accumulated exactly in int32."""
    seed = m * 1000 + k + n + zx
    x = activations(m, k, seed)
    if act == "uint8":
        zx += 128
    sx = float(np.abs(x).max() / 127)
    wq = weights("int8", (k, n), seed)
    ws, axis = weight_scales(k, n, None, False, seed)
    # the quantize kernel is QuantizeLinear bit for bit
    xq_ref = ort_run(quantize_model(k, act, sx, zx), {"x": x})[0]
    sx_a, zx_a = np.array([sx], np.float32), np.array([zx], act)
    xq = run(q_tensor_kernel(k, act), x, sx_a, zx_a, out_shape=(m, k), out_dtype=act)
    np.testing.assert_array_equal(xq, xq_ref)
    # the int32 accumulator is exact (the zero point's share taken out once per output)
    w, s = kernel_weight(wq, ws, axis, None, False, "int8")
    colsum = wq.astype(np.int64).sum(axis=0, keepdims=True).astype(np.int32)
    acc = run(
        kernel(None, k, n, weight="int8", activation=act, accumulator_only=True),
        xq, sx_a, zx_a, w, s, colsum, out_shape=(m, 1, n), out_dtype="int32",
    )
    exact = (xq.astype(np.int64) - zx) @ wq.astype(np.int64)
    np.testing.assert_array_equal(acc[:, 0, :], exact)
    # the fused dequantization matches the QDQ graph
    ref = ort_run(qdq_linear_model(wq, ws, axis=axis, block_size=None, gemm=False, act=("static", act, sx, zx)), {"x": x})[0]
    y = run(kernel(rows(m), k, n, weight="int8", activation=act), xq, sx_a, zx_a, w, s, colsum, out_shape=(m, n))
    assert_close(y, ref)
    if act == "uint8":  # the same definition with the weights in the dot4 (VNNI) layout
        y4 = run(kernel(rows(m), k, n, weight="int8", activation=act, dot4=True), xq, sx_a, zx_a, DOT4.pack(wq, k),
                 s, colsum, out_shape=(m, n))
        np.testing.assert_array_equal(y4, y)


@pytest.mark.parametrize("m", [1, 5, 32, None])
def test_vnni_gemm_is_the_compute_definition(m):
    """The hand-written AVX-512 VNNI GEMM (uint8 x int8, dot4 layout) against the generic
    schedule of the same definition: bit for bit (integer sums, same epilogue order)."""
    if not tvm.target.codegen.target_has_features("avx512vnni", TARGET):
        pytest.skip("needs AVX-512 VNNI")
    k, n = 384, 128
    rows_ = 7 if m is None else m
    rng = np.random.default_rng(rows_)
    xq = rng.integers(0, 256, (rows_, k)).astype(np.uint8)
    wq = rng.integers(-127, 128, (k, n)).astype(np.int8)
    args = [xq, np.array([0.02], np.float32), np.array([131], np.uint8), DOT4.pack(wq, k),
            rng.uniform(0.01, 0.02, (1, n)).astype(np.float32), wq.astype(np.int64).sum(0, keepdims=True).astype(np.int32)]
    func = quantized_matmul(m, k, n, weight="int8", activation="uint8", dot4=True)
    assert x86.applies_dot4(func, TARGET)
    hand = build(func, TARGET)["main"]
    generic = tvm.compile(tvm.IRModule({"main": cpu.schedule(func, TARGET, generic_only=True)}), target=TARGET)["main"]
    assert "vpdpbusd" in build(func, TARGET).mod.inspect_source("asm")
    outs = []
    for f in (hand, generic):
        y = tvm.runtime.tensor(np.zeros((rows_, n), np.float32))
        f(*[tvm.runtime.tensor(a) for a in args], y)
        outs.append(y.numpy())
    np.testing.assert_array_equal(outs[0], outs[1])
    exact = ((xq.astype(np.int64) - 131) @ wq.astype(np.int64)).astype(np.float32)
    np.testing.assert_allclose(outs[0], exact * args[4] * np.float32(0.02), rtol=1e-6)


@pytest.mark.parametrize("m", [1, 5, 32, None])
def test_avx2_gemm_is_the_compute_definition(m):
    """The hand-written AVX2 GEMM (uint8 x int8, dot4 layout, exact vpmaddwd on int16) against the
    generic schedule of the same definition, bit for bit, with activations and weights at the
    extremes where AVX2's saturating vpmaddubsw would be wrong (255 x -128, twice)."""
    if not tvm.target.codegen.target_has_features("avx2", TARGET):
        pytest.skip("needs AVX2")
    k, n = 384, 128
    rows_ = 7 if m is None else m
    rng = np.random.default_rng(rows_)
    xq = rng.integers(0, 256, (rows_, k)).astype(np.uint8)
    wq = rng.integers(-128, 128, (k, n)).astype(np.int8)
    xq[0, :] = 255
    wq[:, 0] = -128  # x . w = 384 * 255 * -128: every int16 pair of vpmaddubsw would saturate
    args = [xq, np.array([0.02], np.float32), np.array([131], np.uint8), DOT4.pack(wq, k),
            rng.uniform(0.01, 0.02, (1, n)).astype(np.float32), wq.astype(np.int64).sum(0, keepdims=True).astype(np.int32)]
    func = quantized_matmul(m, k, n, weight="int8", activation="uint8", dot4=True)
    assert avx2.applies_dot4(func, TARGET)
    lib = tvm.compile(tvm.IRModule({"main": avx2.u8s8_dot4_gemm(func)}), target=TARGET)
    assert "vpmaddwd" in lib.mod.inspect_source("asm")
    generic = tvm.compile(tvm.IRModule({"main": cpu.schedule(func, TARGET, generic_only=True)}), target=TARGET)
    outs = [run(f["main"], *args, out_shape=(rows_, n)) for f in (lib, generic)]
    np.testing.assert_array_equal(outs[0], outs[1])
    exact = ((xq.astype(np.int64) - 131) @ wq.astype(np.int64)).astype(np.float32)
    np.testing.assert_allclose(outs[0], exact * args[4] * np.float32(0.02), rtol=1e-6)


@pytest.mark.parametrize("m", [1, 3, 32, None])
def test_vnni_w4a8_is_the_compute_definition(m):
    """The hand-written AVX-512 VNNI int8 x int4 kernel (W4A8 / W4A4: per-token int8 codes,
    NIB8-packed weights biased to unsigned nibbles) against the generic schedule of the same
    definition, bit for bit, and against the exact integer result."""
    if not tvm.target.codegen.target_has_features("avx512vnni", TARGET):
        pytest.skip("needs AVX-512 VNNI")
    k, n, block = 384, 128, 128
    rows_ = 7 if m is None else m
    rng = np.random.default_rng(rows_ + 1)
    xq = rng.integers(-128, 128, (rows_, k)).astype(np.int8)
    wq = rng.integers(-8, 8, (k, n)).astype(np.int8)
    xs = rng.uniform(0.01, 0.02, rows_).astype(np.float32)
    ws = rng.uniform(0.01, 0.02, (k // block, n)).astype(np.float32)
    func = quantized_matmul(m, k, n, weight="int4", activation="int8", block_size=block, dot4=True)
    assert x86.applies_w4a8(func, TARGET)
    hand = build(func, TARGET)
    assert "vpdpbusd" in hand.mod.inspect_source("asm")
    generic = tvm.compile(tvm.IRModule({"main": cpu.schedule(func, TARGET, generic_only=True)}), target=TARGET)
    outs = [run(f["main"], xq, xs, NIB8.pack(wq, k), ws, out_shape=(rows_, n)) for f in (hand, generic)]
    np.testing.assert_array_equal(outs[0], outs[1])
    exact = sum((xq[:, b * block:(b + 1) * block].astype(np.int64) @ wq[b * block:(b + 1) * block].astype(np.int64))
                .astype(np.float32) * ws[b] for b in range(k // block)) * xs[:, None]
    np.testing.assert_allclose(outs[0], exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m", [1, 3, 32, None])
def test_avx2_w4a8_is_the_compute_definition(m):
    """The hand-written AVX2 int8 x int4 kernel (vpmaddubsw on NIB8 nibbles, exact: at most 15 x
    128 per product) against the generic schedule of the same definition, bit for bit, with the
    extreme codes (-128 activations, -8 weights), and against the exact integer result."""
    if not tvm.target.codegen.target_has_features("avx2", TARGET):
        pytest.skip("needs AVX2")
    k, n, block = 384, 128, 128
    rows_ = 7 if m is None else m
    rng = np.random.default_rng(rows_ + 2)
    xq = rng.integers(-128, 128, (rows_, k)).astype(np.int8)
    wq = rng.integers(-8, 8, (k, n)).astype(np.int8)
    xq[0], wq[:, 0] = -128, -8
    xs = rng.uniform(0.01, 0.02, rows_).astype(np.float32)
    ws = rng.uniform(0.01, 0.02, (k // block, n)).astype(np.float32)
    func = quantized_matmul(m, k, n, weight="int4", activation="int8", block_size=block, dot4=True)
    assert avx2.applies_w4a8(func, TARGET)
    hand = tvm.compile(tvm.IRModule({"main": avx2.w4a8_dot4_gemm(func)}), target=TARGET)
    assert "vpmaddubsw" in hand.mod.inspect_source("asm")
    generic = tvm.compile(tvm.IRModule({"main": cpu.schedule(func, TARGET, generic_only=True)}), target=TARGET)
    outs = [run(f["main"], xq, xs, NIB8.pack(wq, k), ws, out_shape=(rows_, n)) for f in (hand, generic)]
    np.testing.assert_array_equal(outs[0], outs[1])
    exact = sum((xq[:, b * block:(b + 1) * block].astype(np.int64) @ wq[b * block:(b + 1) * block].astype(np.int64))
                .astype(np.float32) * ws[b] for b in range(k // block)) * xs[:, None]
    np.testing.assert_allclose(outs[0], exact, rtol=1e-5, atol=1e-6)


# --- fp8 x fp8 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_fp8_static_matches_ort(m, k, n, dtype):
    seed = m * 1000 + k + n
    x = activations(m, k, seed)
    x[0, :3] = [1e6, -1e6, 0.0]  # saturation and zero
    sx = float(np.abs(x[1:]).max() / FP8_MAX[dtype]) if m > 1 else 0.01
    wq = weights(dtype, (k, n), seed)
    ws, axis = weight_scales(k, n, None, False, seed)
    dq_ref = ort_run(quantize_model(k, dtype, sx, 0.0, dequantize=True), {"x": x})[0]
    sx_a = np.array([sx], np.float32)
    xq = run(q_tensor_kernel(k, dtype), x, sx_a, out_shape=(m, k), out_dtype=dtype)
    np.testing.assert_array_equal(xq.astype(np.float32) * np.float32(sx), dq_ref)
    ref = ort_run(qdq_linear_model(wq, ws, axis=axis, block_size=None, gemm=False, act=("static", dtype, sx, 0.0)), {"x": x})[0]
    w, s = kernel_weight(wq, ws, axis, None, False, dtype)
    y = run(kernel(rows(m), k, n, weight=dtype, activation=dtype), xq, sx_a, w, s, out_shape=(m, n))
    assert_close(y, ref)


# --- W4A8 / W4A4: dynamic per-token int8 or int4 activations x int4 weights ------------------------


@pytest.mark.parametrize("codes,block", [("int8", 128), ("int4", None)])
@pytest.mark.parametrize("m,k,n", SHAPES + [RAGGED])
def test_w4a8_and_w4a4_match_ort(m, k, n, codes, block):
    """W4A8 (int4 blocks of 128) and W4A4 (int4 per channel, int4 codes held in int8) share the
    int8 x int4 kernel; the row quantizer alone decides the grid."""
    seed = m * 1000 + k + n
    x = activations(m, k, seed)
    if m > 1:
        x[-1] = 0.0  # an all-zero token takes the 2^-24 scale floor
    wq = weights("int4", (k, n), seed)
    ws, axis = weight_scales(k, n, block, False, seed)
    xq, xs = [tvm.runtime.tensor(np.zeros(shape, dt)) for shape, dt in (((m, k), "int8"), ((m,), "float32"))]
    q_rows_kernel(k, codes)(tvm.runtime.tensor(x), xq, xs)
    xq, xs = xq.numpy(), xs.numpy()
    # the row quantizer is the PerTokenQDQ function exactly (DQ(Q(x)) = q * scale in fp32)
    dq_ref = ort_run(per_token_model(k, codes), {"x": x})[0]
    np.testing.assert_array_equal(xq.astype(np.float32) * xs[:, None], dq_ref)
    if codes == "int4":
        assert xq.min() >= -8 and xq.max() <= 7
    w, s = kernel_weight(wq, ws, axis, block, False, "int4")
    group = block or k  # None: one block over K
    acc = run(
        kernel(None, k, n, weight="int4", activation="int8", block_size=block, accumulator_only=True),
        xq, xs, w, s, out_shape=(m, s.shape[0], n), out_dtype="int32",
    )
    kp = s.shape[0] * group
    xq_pad = np.zeros((m, kp), np.int64)
    xq_pad[:, :k] = xq
    wq_pad = np.zeros((kp, n), np.int64)
    wq_pad[:k] = wq.astype(np.int64)
    exact = np.einsum("mbk,bkn->mbn", xq_pad.reshape(m, -1, group), wq_pad.reshape(-1, group, n))
    np.testing.assert_array_equal(acc, exact)
    act = "per_token" if codes == "int8" else "per_token_int4"
    ref = ort_run(qdq_linear_model(wq, ws, axis=axis, block_size=block, gemm=False, act=act), {"x": x})[0]
    y = run(kernel(rows(m), k, n, weight="int4", activation="int8", block_size=block), xq, xs, w, s, out_shape=(m, n))
    assert_close(y, ref)


def per_token_model(k: int, codes: str = "int8") -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node(f"PerTokenQDQ_{codes}", ["x"], ["y"], domain="ai.lpcompile")],
        "per_token",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", k])],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("ai.lpcompile", 1)],
        functions=[per_token_function(codes)],
        ir_version=10,
    )


# --- FP8 codecs: every code decodes exactly, encoding rounds to nearest even and saturates ----------


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_fp8_codecs_exact(dtype):
    from tvm import te
    from tvm.s_tir import Schedule

    from lpcompile.backends.tvm.kernels.compute import fp8_to_float32

    codes = np.arange(256, dtype=np.uint8).view(NP[dtype])
    a = te.placeholder((256,), dtype, name="a")
    sch = Schedule(te.create_prim_func([a, te.compute((256,), lambda i: fp8_to_float32(a[i], dtype), name="d")]))
    sch.vectorize(sch.split(sch.get_loops(sch.get_sblock("d"))[0], [None, 16])[1])
    got = run(tvm.compile(sch.mod, target=TARGET)["main"], codes, out_shape=(256,))
    want = codes.astype(np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))  # signed zeros too
    # encoding: every finite code, the midpoints between neighbours (ties), their neighbours,
    # overflow (saturates), NaN
    finite = np.unique(want[~nan])
    mids = (finite[1:] + finite[:-1]) / 2
    vals = np.concatenate([finite, mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf), [1e30, -1e30, np.nan, -0.0]])
    vals = np.resize(vals.astype(np.float32), (-(-vals.size // 256) * 256,)).reshape(-1, 256)
    enc = run(q_tensor_kernel(256, dtype), vals, np.array([1.0], np.float32), out_shape=vals.shape, out_dtype=dtype)
    ref = np.clip(vals, -FP8_MAX[dtype], FP8_MAX[dtype]).astype(NP[dtype])  # ml_dtypes: RNE
    np.testing.assert_array_equal(np.isnan(enc.astype(np.float32)), np.isnan(vals))
    ok = ~np.isnan(vals)
    np.testing.assert_array_equal(enc.view(np.uint8)[ok], ref.view(np.uint8)[ok])


# --- layouts and refusals -----------------------------------------------------------------------


def test_int4_pack_roundtrip_and_layout():
    q = np.random.default_rng(0).integers(-8, 8, (200, 300))
    packed = NIBBLE.pack(q, 256)
    assert packed.shape == (3, 256, 16) and packed.dtype == np.uint32
    np.testing.assert_array_equal(NIBBLE.unpack(packed, 200, 300), q)
    # output j of a tile is nibble j // 16 of word j % 16
    assert (packed[0, 0, 5] >> 8) & 0xF == q[0, 37] & 0xF


def test_unknown_pair_is_refused():
    with pytest.raises(TargetError, match="int8 activations by float8_e4m3fn"):
        quantized_matmul(1, 256, 64, weight="float8_e4m3fn", activation="int8")


# --- CUDA: every kernel compiles with nvcc for every supported arch --------------------------------

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not on PATH")


def cuda_kernels(fp8: bool) -> dict:
    k, n = 256, 96
    funcs = {
        "int4_gemv": quantized_matmul(1, k, n, weight="int4", block_size=128),
        "int4_gemm": quantized_matmul(None, k, n, weight="int4", block_size=128),
        "int8_weight_gemm": quantized_matmul(None, k, n, weight="int8"),
        "int8_int8_gemm": quantized_matmul(None, k, n, weight="int8", activation="int8"),
        "uint8_int8_gemm": quantized_matmul(None, k, n, weight="int8", activation="uint8"),
        "quantize_uint8": quantize_tensor(None, k, "uint8"),
        "w4a8_gemm": quantized_matmul(None, k, n, weight="int4", activation="int8", block_size=128),
        "quantize_int8": quantize_tensor(None, k, "int8"),
        "quantize_rows_int8": quantize_rows(None, k),
        "quantize_rows_int4": quantize_rows(None, k, "int4"),
        # online Hadamard: rows in shared memory (1536 = 12 x 128, 4096), and the global-memory
        # stages of a row too long for two shared buffers (11008 = 344 x 32)
        "hadamard_1536": hadamard_transform(None, 1536, sylvester=128, dense=12, signs=True),
        "hadamard_4096": hadamard_transform(None, 4096, sylvester=4096),
        "hadamard_11008": hadamard_transform(None, 11008, sylvester=32, dense=344, signs=True),
        "hadamard_heads": hadamard_transform(None, 384, sylvester=1, dense=12, inner=32),  # across 12 heads
    }
    # the tensor-core kernels (dot4 weights): symbolic rows, one row, blocked scales
    funcs["uint8_int8_mma"] = quantized_matmul(None, k, n, weight="int8", activation="uint8", dot4=True)
    funcs["int8_int8_mma_gemv"] = quantized_matmul(1, k, n, weight="int8", activation="int8", dot4=True, block_size=128)
    if fp8:
        for dt in ("float8_e4m3fn", "float8_e5m2"):
            funcs[f"{dt}_{dt}_mma"] = quantized_matmul(None, k, n, weight=dt, activation=dt, dot4=True, block_size=128)
            funcs[f"{dt}_weight_gemm"] = quantized_matmul(None, k, n, weight=dt, block_size=128)
            funcs[f"{dt}_{dt}_gemm"] = quantized_matmul(None, k, n, weight=dt, activation=dt)
            funcs[f"quantize_{dt}"] = quantize_tensor(None, k, dt)
    return funcs


@needs_nvcc
@pytest.mark.parametrize("arch", CUDA_ARCHES)
def test_cuda_kernels_compile_with_nvcc(arch):
    target = cuda_target(arch)
    fp8 = int(arch[3:]) >= 89
    funcs = cuda_kernels(fp8)
    ex = build(funcs, target)
    source = ex.mod.imports[0].inspect_source()
    for name in funcs:
        assert f"{name}_kernel" in source, name
    assert "radix_shared" in source and "butterfly0_shared" in source  # shared-memory butterflies
    if fp8:
        assert "__nv_fp8" in source
    binary = cuda_binary(ex, target)
    assert len(binary) > 1000


MMA_TYPES = {"uint8": "u8", "int8": "s8", "float8_e4m3fn": "e4m3", "float8_e5m2": "e5m2"}


@needs_nvcc
@pytest.mark.parametrize("arch", CUDA_ARCHES)
def test_8bit_gemms_use_tensor_cores(arch):
    """The int8 (sm_80+) and fp8 (sm_89+) GEMMs in the dot4 layout are the tensor-core kernel:
    the PTX nvcc makes of them holds mma.sync for the pair's types, and nothing spills to local
    memory (the fragments stay in registers)."""
    from lpcompile.backends.tvm.kernels import mma

    target = cuda_target(arch)
    pairs = [("uint8", "int8"), ("int8", "int8")]
    if int(arch[3:]) >= 89:
        pairs += [("float8_e4m3fn", "float8_e4m3fn"), ("float8_e5m2", "float8_e5m2"), ("float8_e4m3fn", "float8_e5m2")]
    for act, wt in pairs:
        for rows in (None, 1):
            func = quantized_matmul(rows, 512, 128, weight=wt, activation=act, dot4=True, block_size=256)
            assert mma.applies(func, target), (act, wt)
            ptx = cuda_binary(build(func, target), target, "ptx").decode()
            acc = "f32" if wt.startswith("float8") else "s32"
            want = f"mma.sync.aligned.m16n8k32.row.col.{acc}.{MMA_TYPES[act]}.{MMA_TYPES[wt]}.{acc}"
            assert want in ptx, (act, wt, rows)
            assert "ld.local" not in ptx and "st.local" not in ptx, (act, wt, rows)


def test_tensor_core_kernel_takes_only_what_it_can():
    """Shapes or pairs the tensor-core kernel does not cover keep the plain layout and schedule:
    fp8 below sm_89, int4 weights, N not a multiple of 32, K not a multiple of 32, CPUs."""
    from lpcompile.backends.tvm.kernels import mma

    sm80, sm90 = cuda_target("sm_80"), cuda_target("sm_90")
    assert mma.supported(sm80, "uint8", "int8", 256, 256, 64, 256)
    assert not mma.supported(sm80, "float8_e4m3fn", "float8_e4m3fn", 256, 256, 64, 256)
    assert mma.supported(sm90, "float8_e4m3fn", "float8_e4m3fn", 256, 256, 64, 128)
    assert not mma.supported(sm90, "int8", "int4", 256, 256, 64, 128)
    assert not mma.supported(sm90, "uint8", "int8", 256, 256, 48, 256)  # N
    assert not mma.supported(sm90, "uint8", "int8", 200, 224, 64, 224)  # ragged K
    assert not mma.supported(sm90, "uint8", "int8", 256, 256, 64, 48)  # block
    assert not mma.supported(sm90, "float32", "int8", 256, 256, 64, 256)
    assert not mma.supported(host_target(), "uint8", "int8", 256, 256, 64, 256)


@pytest.mark.parametrize("arch", ["sm_80", "sm_86"])
def test_cuda_fp8_needs_sm89(arch):
    with pytest.raises(TargetError, match="sm_89"):
        build(quantized_matmul(None, 256, 64, weight="float8_e4m3fn"), cuda_target(arch))


@needs_nvcc
def test_cuda_compiles_without_fast_math():
    """nvcc gets no --use_fast_math from lpcompile: with it powf becomes __powf (lg2.approx of the
    base: NaN for x^2 of a negative x, which broke LLaMA's RMSNorm on an H200)."""
    from tvm import te

    from lpcompile.backends.tvm.kernels.compute import KERNEL_ATTR

    x = te.placeholder((te.var("n", "int64"),), "float32", name="x")
    y = te.compute(x.shape, lambda i: tvm.tirx.power(x[i], tvm.tirx.const(2.0, "float32")), name="elementwise")
    func = te.create_prim_func([x, y]).with_attr({KERNEL_ATTR: "elementwise"})
    target = cuda_target("sm_90")
    environ = dict(os.environ)
    ptx = cuda_binary(build(func, target), target, "ptx").decode()
    assert "lg2.approx" not in ptx
    assert dict(os.environ) == environ  # no process-wide switch (TVM's is an environment variable)


@needs_nvcc
def test_nvcc_compile_from_threads_leaves_the_environment_alone():
    """Several threads compiling CUDA at once: each gets its fatbin, os.environ never changes."""
    from concurrent.futures import ThreadPoolExecutor

    from lpcompile.backends.tvm.kernels import nvcc_compile
    from lpcompile.errors import BackendError

    target = cuda_target("sm_90")
    source = build(quantize_rows(None, 256), target).mod.imports[0].inspect_source()
    environ = dict(os.environ)
    with ThreadPoolExecutor(2) as pool:
        binaries = list(pool.map(lambda fmt: nvcc_compile(source, target, fmt), ["fatbin", "cubin", "fatbin"]))
    assert all(binaries) and binaries[0] == binaries[2]
    assert dict(os.environ) == environ
    with pytest.raises(BackendError, match="nvcc failed"):
        nvcc_compile("this is not CUDA", target)
    with pytest.raises(TargetError, match="ptx"):
        nvcc_compile(source, target, "exe")
