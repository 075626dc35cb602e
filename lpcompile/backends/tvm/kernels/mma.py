"""Tensor-core GEMM for CUDA: hand-written TIR around the PTX `mma.sync` instruction.

The kernel computes the arithmetic of `compute.quantized_matmul(m, K, N, weight=W,
activation=A, block_size=B, dot4=True)` for 8-bit pairs:

    uint8 / int8 x int8     (W8A8)  mma.sync.m16n8k32 .s32.{u8|s8}.s8.s32        sm_80+
    fp8 x fp8 (E4M3, E5M2)  (FP8)   mma.sync.m16n8k32 .f32.{e4m3|e5m2}x2.f32     sm_89+

Per K block: the block's sum of x * w in the tensor cores' accumulator (int32: exact, the same
integer as every other schedule; fp32: the products of two FP8 values are exact in fp32, only
the order of the additions differs), then y += (acc - zp * colsum) * w_scale[b, n] * x_scale, in
registers, as the definition's epilogue does.

TVM 0.27 cannot tensorize (`Schedule.tensorize` crashes the process, see ENVIRONMENT notes in the
package docs), so the instruction is a small CUDA device function with inline PTX, called from
TIR through `cuda_func_call`; nvcc inlines it and keeps the fragments in registers.

Work split: a warp computes a (16 * M_FRAGS) x 32 tile of y (M_FRAGS x 4 mma tiles), a block is
WARPS warps side by side along N. Each thread loads its own fragment elements straight from global
memory, 4 bytes at a time:
  A (x, row-major [m, K]): rows g, g+8 and k t*4.., 16+t*4.. of each 16 x 32 step;
  B (w, dot4 layout [N/16, K/4, 16, 4]): the 4 consecutive k of one output are one 32-bit word, and
    a warp's 32 words of one step are four 32-byte runs (full sectors);
(g = lane / 4, t = lane % 4: the fragment layouts of PTX ISA "mma.m16n8k32" for 8-bit types).
Rows beyond m re-read the last row and are not stored.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.backend.cuda.op import cuda_func_call
from tvm.script import tirx as T

from lpcompile.backends.tvm.kernels.compute import FLOAT8

MMA_M, MMA_N, MMA_K = 16, 8, 32
N_FRAGS = 4  # n8 tiles per warp: 32 outputs
WARPS = 4
THREADS = 32 * WARPS
PTX_TYPE = {"int8": "s8", "uint8": "u8", "float8_e4m3fn": "e4m3", "float8_e5m2": "e5m2"}
INT_MIN_SM, FP8_MIN_SM = 80, 89


def supported(target: tvm.target.Target, activation: str, weight: str, k: int, k_pad: int, n: int, block: int) -> bool:
    """Whether a layer fits the tensor-core kernel on `target` (so its weights go in the dot4
    layout): an 8-bit pair the arch multiplies, K a whole number of 32-deep steps per block, N a
    whole number of warp tiles."""
    if target.kind.name != "cuda" or activation not in PTX_TYPE or weight not in PTX_TYPE:
        return False
    if (activation in FLOAT8) != (weight in FLOAT8) or (weight == "uint8"):
        return False
    arch = str(target.attrs.get("arch", "sm_0"))
    sm = int(arch[3:].rstrip("a")) if arch.startswith("sm_") else 0
    need = FP8_MIN_SM if weight in FLOAT8 else INT_MIN_SM
    return sm >= need and k == k_pad and block % MMA_K == 0 and k % block == 0 and n % (MMA_N * N_FRAGS) == 0


def applies(func: tirx.PrimFunc, target: tvm.target.Target) -> bool:
    attrs = func.attrs
    if attrs is None or attrs.get("lpcompile.kernel") != "quantized_matmul" or not attrs.get("lpcompile.dot4"):
        return False
    if "y" not in [p.name for p in func.params]:  # accumulator_only variants keep the generic path
        return False
    k, n, block = int(attrs["lpcompile.k"]), int(attrs["lpcompile.n"]), int(attrs["lpcompile.block"])
    return supported(target, str(attrs["lpcompile.activation"]), str(attrs["lpcompile.weight"]), k, k, n, block)


def _mma_function(activation: str, weight: str) -> tuple[str, str, str]:
    """(name, CUDA source, accumulator dtype) of the device function doing one m16n8k32 mma."""
    a, b = PTX_TYPE[activation], PTX_TYPE[weight]
    acc, ctype, reg = ("float32", "float", "f") if weight in FLOAT8 else ("int32", "int", "r")
    d = "f32" if acc == "float32" else "s32"
    name = f"lpc_mma_m16n8k32_{a}{b}"
    source = f"""
__device__ __forceinline__ void {name}({ctype}* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                        unsigned b0, unsigned b1) {{
  asm volatile("mma.sync.aligned.m16n8k32.row.col.{d}.{a}.{b}.{d} "
               "{{%0,%1,%2,%3}}, {{%4,%5,%6,%7}}, {{%8,%9}}, {{%0,%1,%2,%3}};\\n"
               : "+{reg}"(c[0]), "+{reg}"(c[1]), "+{reg}"(c[2]), "+{reg}"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}}
"""
    return name, source, acc


def m_frags(func: tirx.PrimFunc) -> int:
    """16-row fragments per warp: 1 for a few rows (decode), 2 otherwise (reuses each B word twice)."""
    m = func.params[0].shape[0]
    return 1 if isinstance(m, tirx.IntImm) and int(m) <= MMA_M else 2


def mma_gemm(func: tirx.PrimFunc, frags: int | None = None) -> tirx.PrimFunc:
    """The tensor-core kernel for a dot4 8-bit `quantized_matmul` definition (rows static or symbolic)."""
    attrs = func.attrs
    activation, weight = str(attrs["lpcompile.activation"]), str(attrs["lpcompile.weight"])
    k, n, block = int(attrs["lpcompile.k"]), int(attrs["lpcompile.n"]), int(attrs["lpcompile.block"])
    m = func.params[0].shape[0]
    mf = frags or m_frags(func)
    nb, steps = k // block, block // MMA_K
    name, source, acc_dtype = _mma_function(activation, weight)
    rows_per_block, cols_per_block = MMA_M * mf, MMA_N * N_FRAGS * WARPS
    warp_tiles = n // (MMA_N * N_FRAGS)
    w_shape = (n // 16, k // 4, 16, 4)
    zero = tirx.const(0, acc_dtype)

    def mma(acc, i, a, b, j):
        return cuda_func_call(name, T.address_of(acc[(i * N_FRAGS + j) * 4]), a[i * 4], a[i * 4 + 1], a[i * 4 + 2],
                              a[i * 4 + 3], b[j * 2], b[j * 2 + 1], source_code=source)

    def term(acc, e, kb, col, zp, colsum, w_scale):  # one block's share of y[., col], as the definition's epilogue
        if zp is None:
            return acc[e] * w_scale[kb, col]
        return T.Cast("float32", acc[e] - T.Cast("int32", zp[0]) * colsum[kb, col]) * w_scale[kb, col]

    @T.macro
    def body(x, x_scale, zp, w, w_scale, colsum, y):
        xb = T.decl_buffer((m * k // 4,), "uint32", data=x.data)  # the same bytes, 4 per word
        wb = T.decl_buffer((n * k // 4,), "uint32", data=w.data)
        for bm in T.thread_binding((m + rows_per_block - 1) // rows_per_block, thread="blockIdx.y"):
            for bn in T.thread_binding((n + cols_per_block - 1) // cols_per_block, thread="blockIdx.x"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    wt = bn * WARPS + tx // 32  # this warp's 32 output columns
                    g = tx % 32 // 4
                    t = tx % 4
                    if wt < warp_tiles:
                        acc = T.decl_buffer((mf * N_FRAGS * 4,), acc_dtype, scope="local")
                        out = T.decl_buffer((mf * N_FRAGS * 4,), "float32", scope="local")
                        a = T.decl_buffer((mf * 4,), "uint32", scope="local")
                        b = T.decl_buffer((N_FRAGS * 2,), "uint32", scope="local")
                        for e in T.unroll(mf * N_FRAGS * 4):
                            out[e] = T.float32(0)
                        for kb in range(nb):
                            for e in T.unroll(mf * N_FRAGS * 4):
                                acc[e] = zero
                            for s in range(steps):
                                for i in T.unroll(mf):
                                    for h in T.unroll(4):  # rows g, g+8; k t*4.., 16+t*4..
                                        a[i * 4 + h] = xb[(T.min(bm * rows_per_block + i * 16 + g + h % 2 * 8, m - 1) * k
                                                           + (kb * steps + s) * 32 + h // 2 * 16 + t * 4) // 4]
                                for j in T.unroll(N_FRAGS):
                                    for h in T.unroll(2):  # output g of the n8 tile; k t*4.., 16+t*4..
                                        b[j * 2 + h] = wb[((wt * 2 + j // 2) * (k // 4) + (kb * steps + s) * 8 + h * 4 + t) * 16
                                                          + j % 2 * 8 + g]
                                for i in T.unroll(mf):
                                    for j in T.unroll(N_FRAGS):
                                        T.evaluate(mma(acc, i, a, b, j))
                            for i in T.unroll(mf):
                                for j in T.unroll(N_FRAGS):
                                    for e in T.unroll(4):  # rows g, g, g+8, g+8; columns t*2, t*2+1
                                        out[(i * N_FRAGS + j) * 4 + e] = out[(i * N_FRAGS + j) * 4 + e] + term(
                                            acc, (i * N_FRAGS + j) * 4 + e, kb, wt * 32 + j * 8 + t * 2 + e % 2, zp, colsum, w_scale
                                        ) * x_scale[0]
                        for i in T.unroll(mf):
                            for j in T.unroll(N_FRAGS):
                                for e in T.unroll(4):
                                    if bm * rows_per_block + i * 16 + g + e // 2 * 8 < m:
                                        y[bm * rows_per_block + i * 16 + g + e // 2 * 8, wt * 32 + j * 8 + t * 2 + e % 2] = out[
                                            (i * N_FRAGS + j) * 4 + e]

    if activation in FLOAT8:

        @T.prim_func(private=True)
        def kernel(
            x: T.Buffer((m, k), activation),
            x_scale: T.Buffer((1,), "float32"),
            w: T.Buffer(w_shape, weight),
            w_scale: T.Buffer((nb, n), "float32"),
            y: T.Buffer((m, n), "float32"),
        ):
            T.func_attr({"tirx.noalias": True})
            body(x, x_scale, None, w, w_scale, None, y)
    else:

        @T.prim_func(private=True)
        def kernel(
            x: T.Buffer((m, k), activation),
            x_scale: T.Buffer((1,), "float32"),
            x_zero_point: T.Buffer((1,), activation),
            w: T.Buffer(w_shape, weight),
            w_scale: T.Buffer((nb, n), "float32"),
            w_colsum: T.Buffer((nb, n), "int32"),
            y: T.Buffer((m, n), "float32"),
        ):
            T.func_attr({"tirx.noalias": True})
            body(x, x_scale, x_zero_point, w, w_scale, w_colsum, y)

    return kernel.with_attrs({**(dict(attrs.items()) if attrs is not None else {}), "lpcompile.mma": f"m16n8k32 x{mf}"})
