"""Tensor-core GEMM for CUDA: hand-written TIR around the PTX `mma.sync` instruction.

The kernel computes the arithmetic of `compute.quantized_matmul(m, K, N, weight=W,
activation=A, block_size=B, dot4=True)` for 8-bit pairs:

    uint8 / int8 x int8     (W8A8)  mma.sync.m16n8k32 .s32.{u8|s8}.s8.s32        sm_80+
    fp8 x fp8 (E4M3, E5M2)  (FP8)   mma.sync.m16n8k32 .f32.{e4m3|e5m2}.{e4m3|e5m2}.f32  sm_89+

Per K block: the block's sum of x * w in the tensor cores' accumulator (int32: exact, the same
integer as every other schedule; fp32: the products of two FP8 values are exact in fp32, only
the order of the additions differs), then y += (acc - zp * colsum) * w_scale[b, n] * x_scale, in
registers, as the definition's epilogue does.

TVM 0.27 cannot tensorize (`Schedule.tensorize` crashes the process, even on TVM's own
intrinsics), so the instruction is a small CUDA device function with inline PTX, called from
TIR through `cuda_func_call`; nvcc inlines it and keeps the fragments in registers.

Work split (`Tiling`): a warp computes (16 * m_frags) x (8 * n_frags) of y; warps_n warps sit side
by side along N, and for a few rows (decode) warps_k warps split K and add their partial sums in
shared memory, so that a layer's few column tiles still occupy the GPU. Each thread loads its own
fragment elements straight from global memory (L1/L2), 4 bytes at a time:
  A (x, row-major [m, K]): rows g, g+8 and k t*4.., 16+t*4.. of each 16 x 32 step;
  B (w, dot4 layout [N/16, K/4, 16, 4]): the 4 consecutive k of one output are one 32-bit word, and
    a warp's 32 words of one step are four 32-byte runs (full sectors);
(g = lane / 4, t = lane % 4: the fragment layouts of PTX ISA "mma.m16n8k32" for 8-bit types).
Rows beyond m re-read the last row and are not stored. No shared-memory staging of A and B yet:
see benchmarks/results/gpu_kernels.json for where that leaves it against cuBLAS.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import tvm
from tvm import tirx
from tvm.backend.cuda.op import cuda_func_call
from tvm.script import tirx as T

from lpcompile.backends.tvm.kernels.compute import FLOAT8

MMA_M, MMA_N, MMA_K = 16, 8, 32
PTX_TYPE = {"int8": "s8", "uint8": "u8", "float8_e4m3fn": "e4m3", "float8_e5m2": "e5m2"}


def supported(target: tvm.target.Target, activation: str, weight: str, k: int, k_pad: int, n: int, block: int) -> bool:
    """Whether a layer fits the tensor-core kernel on `target` (so its weights go in the dot4
    layout): the rule "mma-tensor-core" of `rules` (an 8-bit pair the arch multiplies, K a whole
    number of 32-deep steps per block, N a whole number of warp tiles)."""
    from lpcompile.backends.tvm.kernels.rules import MatmulSpec, rule
    from lpcompile.backends.tvm.target import describe

    t = describe(target)
    return t.kind == "cuda" and k == k_pad and rule("cuda", "mma-tensor-core").applies(
        t, MatmulSpec(activation, weight, k, n, block)) is None


def applies(func: tirx.PrimFunc, target: tvm.target.Target) -> bool:
    """Whether the tensor-core kernel takes the definition `func` on `target`."""
    from lpcompile.backends.tvm.kernels.rules import applies as rule_applies

    return target.kind.name == "cuda" and rule_applies("mma-tensor-core", func, target)


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


@dataclass(frozen=True)
class Tiling:
    """How the tensor-core kernel splits y: a warp computes (16 * m_frags) x (8 * n_frags) of it;
    warps_n warps sit side by side along N; warps_k warps split K between them (their partial
    sums meet in shared memory, added in a fixed order); `unroll` 32-deep steps are issued
    together so their loads are in flight at once."""

    m_frags: int = 2
    n_frags: int = 4
    warps_n: int = 4
    warps_k: int = 1
    unroll: int = 2


# Measured on an H200 at K = N = 4096 (benchmarks/gpu_kernels.py, results/gpu_kernels.json):
# rows 1..128: a 16 x 32 warp tile with K split over 4 warps is fastest (uint8 x int8: 12 us at
# 1 row, 35 us at 128); 1024 rows: a 32 x 64 warp tile (126 us, against 245 for the former).
SMALL = Tiling(m_frags=1, n_frags=4, warps_n=1, warps_k=4, unroll=2)
LARGE = Tiling(m_frags=2, n_frags=8, warps_n=4, warps_k=1, unroll=2)
SMALL_ROWS = 128  # up to this many rows the SMALL tiling runs, above it LARGE
THREADS = 128  # both tilings' block size, so one kernel can pick either at run time


def _first_fit(options, k: int, n: int, block: int) -> Tiling:
    for tl in options:
        if fits(tl, k, n, block):
            return tl
    return Tiling(m_frags=1, n_frags=2, warps_n=4, warps_k=1, unroll=1)  # fits every supported layer


def tilings(k: int, n: int, block: int) -> tuple[Tiling, Tiling]:
    """The (few rows, many rows) tilings for a layer, each of THREADS threads, falling back to
    narrower tiles or less unrolling where the layer's K or N does not divide."""
    small = _first_fit([SMALL, replace(SMALL, unroll=1), Tiling(1, 4, 2, 2, 1), Tiling(1, 4, 4, 1, 1)], k, n, block)
    large = _first_fit([LARGE, replace(LARGE, unroll=1), Tiling(2, 4, 4, 1, 2), Tiling(2, 4, 4, 1, 1)], k, n, block)
    return small, large


def fits(tiling: Tiling, k: int, n: int, block: int) -> bool:
    nb = k // block
    per_warp = block // MMA_K // tiling.warps_k if nb == 1 else block // MMA_K
    return (n % (MMA_N * tiling.n_frags) == 0 and tiling.n_frags % 2 == 0 and per_warp >= 1
            and (nb > 1 or (block // MMA_K) % tiling.warps_k == 0) and per_warp % tiling.unroll == 0)


def mma_gemm(func: tirx.PrimFunc, tiling: Tiling | None = None) -> tirx.PrimFunc:
    """The tensor-core kernel for a dot4 8-bit `quantized_matmul` definition (rows static or
    symbolic). Without `tiling`, rows up to SMALL_ROWS run the small-rows tiling and more rows
    the large one: chosen at build time for static rows, else by a branch on the row count at
    run time (one kernel; its grid is sized for the branch taken)."""
    attrs = func.attrs
    activation, weight = str(attrs["lpcompile.activation"]), str(attrs["lpcompile.weight"])
    k, n, block = int(attrs["lpcompile.k"]), int(attrs["lpcompile.n"]), int(attrs["lpcompile.block"])
    m = func.params[0].shape[0]
    nb = k // block
    name, source, acc_dtype = _mma_function(activation, weight)
    w_shape = (n // 16, k // 4, 16, 4)
    if tiling is not None:
        if not fits(tiling, k, n, block):
            raise ValueError(f"{tiling} does not fit K={k}, N={n}, block {block}")
        small = large = tiling
    else:
        small, large = tilings(k, n, block)
        if isinstance(m, tirx.IntImm):
            small = large = small if int(m) <= SMALL_ROWS else large
    fixed = small == large

    def grid(tl: Tiling):
        rows, cols = MMA_M * tl.m_frags, MMA_N * tl.n_frags * tl.warps_n
        return (m + rows - 1) // rows, (n + cols - 1) // cols

    few = m <= SMALL_ROWS
    grid_y = grid(small)[0] if fixed else tirx.if_then_else(few, grid(small)[0], grid(large)[0])
    grid_x = grid(small)[1] if fixed else tirx.if_then_else(few, grid(small)[1], grid(large)[1])
    threads = 32 * small.warps_n * small.warps_k
    small_tile = _tile_macro(small, name, source, acc_dtype, m, k, n, block)
    large_tile = small_tile if fixed else _tile_macro(large, name, source, acc_dtype, m, k, n, block)

    @T.macro
    def body(x, x_scale, zp, w, w_scale, colsum, y):
        xb = T.decl_buffer((m * k // 4,), "uint32", data=x.data)  # the same bytes, 4 per word
        wb = T.decl_buffer((n * k // 4,), "uint32", data=w.data)
        for bm in T.thread_binding(grid_y, thread="blockIdx.y"):
            for bn in T.thread_binding(grid_x, thread="blockIdx.x"):
                for tx in T.thread_binding(threads, thread="threadIdx.x"):
                    if fixed:
                        small_tile(xb, wb, x_scale, zp, w_scale, colsum, y, bm, bn, tx)
                    else:
                        if few:
                            small_tile(xb, wb, x_scale, zp, w_scale, colsum, y, bm, bn, tx)
                        else:
                            large_tile(xb, wb, x_scale, zp, w_scale, colsum, y, bm, bn, tx)

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

    shown = (small,) if fixed else (small, large)
    return kernel.with_attrs({**(dict(attrs.items()) if attrs is not None else {}),
                              "lpcompile.mma": "; ".join(f"{t.m_frags}x{t.n_frags} frags, {t.warps_n}x{t.warps_k} warps" for t in shown)})


def _tile_macro(tl: Tiling, name: str, source: str, acc_dtype: str, m, k: int, n: int, block: int):
    """The per-thread work of one block (bm, bn) under tiling `tl`, as a TVMScript macro."""
    mf, nf, wn_, wk_, un = tl.m_frags, tl.n_frags, tl.warps_n, tl.warps_k, tl.unroll
    nb = k // block
    # K per warp: one block's steps split between the warps, or whole blocks dealt round-robin
    steps = block // MMA_K // wk_ if nb == 1 else block // MMA_K
    rounds = 1 if nb == 1 else (nb + wk_ - 1) // wk_
    frag = mf * nf * 4  # accumulator elements per thread
    rows_per_block, cols_per_warp = MMA_M * mf, MMA_N * nf
    warp_tiles = n // cols_per_warp
    part_dtype = acc_dtype if nb == 1 else "float32"  # what the K-splitting warps add up
    zero = tirx.const(0, acc_dtype)

    def mma(acc, i, a, b, j):
        return cuda_func_call(name, T.address_of(acc[(i * nf + j) * 4]), a[i * 4], a[i * 4 + 1], a[i * 4 + 2],
                              a[i * 4 + 3], b[j * 2], b[j * 2 + 1], source_code=source)

    def term(acc, e, kb, col, zp, colsum, w_scale):  # one block's share of y[., col], as the definition's epilogue
        if zp is None:
            return acc[e] * w_scale[kb, col]
        return T.Cast("float32", acc[e] - T.Cast("int32", zp[0]) * colsum[kb, col]) * w_scale[kb, col]

    def col(wt, j, t, e):
        return wt * cols_per_warp + j * 8 + t * 2 + e % 2

    @T.macro
    def step(xb, wb, acc, a, b, bm, wt, g, t, kstep):  # one 32-deep step of the warp's tile
        for i in T.unroll(mf):
            for h in T.unroll(4):  # rows g, g+8; k t*4.., 16+t*4..
                a[i * 4 + h] = xb[(T.min(bm * rows_per_block + i * 16 + g + h % 2 * 8, m - 1) * k
                                   + kstep * 32 + h // 2 * 16 + t * 4) // 4]
        for j in T.unroll(nf):
            for h in T.unroll(2):  # output g of the n8 tile; k t*4.., 16+t*4..
                b[j * 2 + h] = wb[((wt * nf // 2 + j // 2) * (k // 4) + kstep * 8 + h * 4 + t) * 16 + j % 2 * 8 + g]
        for i in T.unroll(mf):
            for j in T.unroll(nf):
                T.evaluate(mma(acc, i, a, b, j))

    @T.macro
    def tile(xb, wb, x_scale, zp, w_scale, colsum, y, bm, bn, tx):
        wn = tx // 32 % wn_
        wk = tx // 32 // wn_
        wt = bn * wn_ + wn  # this warp's column tile
        g = tx % 32 // 4
        t = tx % 4
        acc = T.decl_buffer((frag,), acc_dtype, scope="local")
        out = T.decl_buffer((frag,), "float32", scope="local")
        a = T.decl_buffer((mf * 4,), "uint32", scope="local")
        b = T.decl_buffer((nf * 2,), "uint32", scope="local")
        for e in T.unroll(frag):
            out[e] = T.float32(0)
        for r in range(rounds):
            kb = r * wk_ + wk if nb > 1 else 0
            for e in T.unroll(frag):
                acc[e] = zero
            if wt < warp_tiles and kb < nb:
                for so in range(steps // un):
                    for si in T.unroll(un):
                        step(xb, wb, acc, a, b, bm, wt, g, t,
                             kb * (block // MMA_K) + (wk * steps if nb == 1 else 0) + so * un + si)
                if nb > 1:
                    for i in T.unroll(mf):
                        for j in T.unroll(nf):
                            for e in T.unroll(4):
                                out[(i * nf + j) * 4 + e] = out[(i * nf + j) * 4 + e] + term(
                                    acc, (i * nf + j) * 4 + e, kb, col(wt, j, t, e), zp, colsum, w_scale) * x_scale[0]
        if wk_ > 1:  # the K-splitting warps' partial sums, added in warp order by the first
            red = T.decl_buffer((wk_ * wn_ * 32 * frag,), part_dtype, scope="shared")
            if wk > 0:
                for e in T.unroll(frag):
                    red[(tx - 32 * wn_) * frag + e] = acc[e] if nb == 1 else out[e]
            T.tvm_storage_sync("shared")
            if wk == 0:
                for q in range(wk_ - 1):
                    for e in T.unroll(frag):
                        if nb == 1:
                            acc[e] = acc[e] + red[(q * wn_ * 32 + tx) * frag + e]
                        else:
                            out[e] = out[e] + red[(q * wn_ * 32 + tx) * frag + e]
        if wk == 0 and wt < warp_tiles:
            for i in T.unroll(mf):
                for j in T.unroll(nf):
                    for e in T.unroll(4):  # rows g, g, g+8, g+8; columns t*2, t*2+1
                        if nb == 1:
                            out[(i * nf + j) * 4 + e] = term(acc, (i * nf + j) * 4 + e, 0, col(wt, j, t, e),
                                                             zp, colsum, w_scale) * x_scale[0]
                        if bm * rows_per_block + i * 16 + g + e // 2 * 8 < m:
                            y[bm * rows_per_block + i * 16 + g + e // 2 * 8, col(wt, j, t, e)] = out[(i * nf + j) * 4 + e]

    return tile
