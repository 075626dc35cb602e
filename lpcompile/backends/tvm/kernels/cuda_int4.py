"""CUDA kernel for float x int4 (W4A16) with few rows: the decode GEMV and small GEMMs.

The arithmetic of `compute.quantized_matmul(m, K, N, weight="int4", block_size=B)` (weights in
`packing.NIBBLE` tiles: word [tile, k, lane] holds the 8 nibbles of outputs tile*128 + lane + 16h at
row k): y = sum over K blocks b of (sum over the block's k of x * w) * w_scale[b, n].

The plain schedule gives one thread per output and walks all of K in it: 32 blocks for a
4096-wide layer, 262 us at 4096 x 4096 on an H200 (benchmarks/results/gpu_kernels.json). Here a
block takes half a tile (8 lanes, 64 outputs) and ROWS rows, and its PHASES x 8 threads split K:
thread (phase p, lane l) reads the words of rows k = p, p + PHASES, ... (a warp reads 4 rows' 32
contiguous bytes each), decodes 8 outputs per word in registers, keeps per-K-block sums and applies
the block scale, and the phases' partial outputs meet in shared memory, added in phase order.
Float additions happen in another order than on the CPU (fp32 rounding differences only).
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script import tirx as T

from lpcompile.backends.tvm.kernels.packing import NIBBLE

LANES = 8  # word lanes per block: half a NIBBLE tile, 64 outputs
PHASES = 32  # threads splitting K per lane
THREADS = LANES * PHASES
UNROLL = 4
MAX_ROWS = 4  # rows per block; more rows go to more blocks


def applies(func: tirx.PrimFunc, target: tvm.target.Target) -> bool:
    """Whether this kernel takes `func` on `target` (the rule "cuda-int4-split-k" of `rules`)."""
    from lpcompile.backends.tvm.kernels.rules import applies as rule_applies

    return target.kind.name == "cuda" and rule_applies("cuda-int4-split-k", func, target)


def int4_gemm(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The split-K kernel for a float x int4 definition (rows static or symbolic)."""
    attrs = func.attrs
    k, n, block = int(attrs["lpcompile.k"]), int(attrs["lpcompile.n"]), int(attrs["lpcompile.block"])
    m = func.params[0].shape[0]
    rows = 1 if isinstance(m, tirx.IntImm) and int(m) == 1 else MAX_ROWS
    nb, tiles = k // block, (n + NIBBLE.tile - 1) // NIBBLE.tile
    per_block = block // PHASES  # rows of K a thread takes per K block
    cols = LANES * NIBBLE.per_word  # outputs per block
    w_shape = tuple(int(d) for d in func.params[1].shape)

    @T.prim_func(private=True)
    def kernel(
        x: T.Buffer((m, k), "float32"),
        w: T.Buffer(w_shape, "uint32"),
        w_scale: T.Buffer((nb, n), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for br in T.thread_binding((m + rows - 1) // rows, thread="blockIdx.y"):
            for bc in T.thread_binding(tiles * 2, thread="blockIdx.x"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    red = T.decl_buffer((PHASES * rows * cols,), "float32", scope="shared")
                    acc = T.decl_buffer((rows * 8,), "float32", scope="local")
                    out = T.decl_buffer((rows * 8,), "float32", scope="local")
                    xv = T.decl_buffer((rows,), "float32", scope="local")
                    lane = tx % LANES + bc % 2 * LANES  # word lane within the tile
                    p = tx // LANES
                    for e in T.unroll(rows * 8):
                        out[e] = T.float32(0)
                    for b in range(nb):
                        for e in T.unroll(rows * 8):
                            acc[e] = T.float32(0)
                        for ko in range(per_block // UNROLL):
                            for ki in T.unroll(UNROLL):
                                word = w[bc // 2, b * block + (ko * UNROLL + ki) * PHASES + p, lane]
                                for r in T.unroll(rows):
                                    xv[r] = x[T.min(br * rows + r, m - 1), b * block + (ko * UNROLL + ki) * PHASES + p]
                                for h in T.unroll(8):  # nibble h: output lane + 16h, sign-extended
                                    for r in T.unroll(rows):
                                        acc[r * 8 + h] = acc[r * 8 + h] + xv[r] * T.Cast(
                                            "float32", T.shift_right(T.shift_left(T.reinterpret("int32", word), 28 - 4 * h), 28))
                        for r in T.unroll(rows):
                            for h in T.unroll(8):
                                out[r * 8 + h] = out[r * 8 + h] + acc[r * 8 + h] * w_scale[
                                    b, T.min(bc // 2 * NIBBLE.tile + h * NIBBLE.lanes + lane, n - 1)]
                    for r in T.unroll(rows):
                        for h in T.unroll(8):  # [phase, row, output of the block]
                            red[(p * rows + r) * cols + h * LANES + tx % LANES] = out[r * 8 + h]
                    T.tvm_storage_sync("shared")
                    for o in T.unroll((rows * cols + THREADS - 1) // THREADS):
                        if o * THREADS + tx < rows * cols:
                            s = T.decl_buffer((1,), "float32", scope="local")
                            s[0] = T.float32(0)
                            for q in range(PHASES):
                                s[0] = s[0] + red[(q * rows + (o * THREADS + tx) // cols) * cols + (o * THREADS + tx) % cols]
                            # output: row (o*THREADS+tx) // cols; column h*16 + lane of the tile, where
                            # the block's output c = h * LANES + l
                            if br * rows + (o * THREADS + tx) // cols < m and (
                                    bc // 2 * NIBBLE.tile + (o * THREADS + tx) % cols // LANES * NIBBLE.lanes
                                    + (o * THREADS + tx) % LANES + bc % 2 * LANES) < n:
                                y[br * rows + (o * THREADS + tx) // cols,
                                  bc // 2 * NIBBLE.tile + (o * THREADS + tx) % cols // LANES * NIBBLE.lanes
                                  + (o * THREADS + tx) % LANES + bc % 2 * LANES] = s[0]

    return kernel.with_attrs(dict(attrs.items()))
