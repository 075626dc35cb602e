"""Hand-written x86 AVX2 TIR for CPUs without AVX-512 VNNI (AMD Zen 2/3, older Intel): the
uint8 x int8 GEMM (W8A8) on the same dot4 weight layout as the VNNI kernel.

AVX2's 8-bit dot product, `vpmaddubsw` (u8 x s8 pairs summed into s16), saturates: 255 * -128
* 2 = -65280 does not fit an int16, so it would not be the shared compute definition. This
kernel takes the exact s16 path instead: the weights are sign-extended to int16 (`vpmovsxbw`),
the activations zero-extended once per row tile, and `vpmaddwd` sums s16 pairs into s32 exactly.
On Zen 2 that is no slower than the saturating path: `vpmaddubsw` needs a second `vpmaddwd`
(with ones) to reach int32, and both run on the same multiply pipe, so either way one multiply
instruction per 16 multiply-adds.

Layout (`packing.DOT4`): w[n // 16, k // 4, n % 16, k % 4]. 16 bytes (4 outputs x 4 k), extended
to 16 int16, times the 4 activations of a row broadcast 4 times, give per output two partial
sums (k 0-1 and k 2-3) in adjacent int32 lanes; they are accumulated over all of K as they are
(integer addition is exact in any order) and added pairwise in the epilogue. Then the VNNI
kernel's epilogue: float(acc - x_zero_point * w_colsum) * w_scale * x_scale, so the result is
bit-identical to the generic schedule of `compute.quantized_matmul(..., dot4=True)` (a test
checks it).
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script import tirx as T

from lpcompile.backends.tvm.kernels.packing import DOT4

PMADDWD = "llvm.x86.avx2.pmadd.wd"  # <16 x i16>, <16 x i16> -> <8 x i32>
LANES = 8  # int32 / float32 lanes of a 256-bit vector
ROWS = 4  # rows per micro-tile
CHUNKS = 2  # 4-output weight chunks per micro-tile: 4 x 2 int32x8 accumulators
K_STEP = 16  # activations are widened 16 at a time (K must be a multiple)
EVEN = [2 * i for i in range(LANES)]
ODD = [2 * i + 1 for i in range(LANES)]


def applies_dot4(func: tirx.PrimFunc, target: tvm.target.Target) -> bool:
    """Whether this GEMM takes `func` on `target` (the rule "avx2-u8s8-gemm" of `rules`)."""
    from lpcompile.backends.tvm.kernels.rules import applies as rule_applies

    return rule_applies("avx2-u8s8-gemm", func, target)


def u8s8_dot4_gemm(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The AVX2 GEMM for a dot4 uint8 x int8 definition (rows static or symbolic)."""
    attrs = func.attrs
    k, n = int(attrs["lpcompile.k"]), int(attrs["lpcompile.n"])
    m = func.params[0].shape[0]  # an IntImm or the definition's own symbolic row count
    kq, tiles = k // DOT4.group, n // DOT4.lanes
    rows = ROWS if not isinstance(m, tirx.IntImm) or int(m) >= ROWS else int(m)
    halves = DOT4.lanes // (CHUNKS * 4)  # micro-tiles of 8 outputs per 16-output weight tile

    @T.prim_func(private=True)
    def gemm(
        x: T.Buffer((m, k), "uint8"),
        x_scale: T.Buffer((1,), "float32"),
        x_zero_point: T.Buffer((1,), "uint8"),
        w: T.Buffer((tiles, kq, DOT4.lanes, DOT4.group), "int8"),
        w_scale: T.Buffer((1, n), "float32"),
        w_colsum: T.Buffer((1, n), "int32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(tiles):
            for io in range((m + rows - 1) // rows):
                # the row tile's activations as int16 (the tail re-reads the last row)
                xw = T.decl_buffer((rows * k,), "int16", scope="local")
                for r in T.unroll(rows):
                    for kc in range(k // K_STEP):
                        xw[T.Ramp(r * k + kc * K_STEP, 1, K_STEP)] = T.Cast(
                            "int16x16", x.vload([T.min(io * rows + r, m - 1), kc * K_STEP], "uint8x16"))
                for hf in range(halves):
                    acc = T.decl_buffer((rows * CHUNKS,), "int32x8", scope="local")
                    for i in T.unroll(rows * CHUNKS):
                        acc[i] = T.Broadcast(T.int32(0), LANES)
                    for q in range(kq):
                        for c in T.unroll(CHUNKS):
                            for r in T.unroll(rows):
                                acc[r * CHUNKS + c] = acc[r * CHUNKS + c] + T.call_llvm_pure_intrin(
                                    "int32x8", T.llvm_lookup_intrinsic_id(PMADDWD),
                                    # x[k 4q .. 4q+3] as int16, broadcast to the 4 outputs of the chunk
                                    T.reinterpret("int16x16", T.Broadcast(
                                        T.reinterpret("int64", xw.vload([r * k + q * 4], "int16x4")), 4)),
                                    T.Cast("int16x16", w.vload([t, q, (hf * CHUNKS + c) * 4, 0], "int8x16")))
                    for r in T.unroll(rows):
                        if io * rows + r < m:
                            # lanes (2j, 2j + 1) of chunks 0, 1: the two halves of output j's sum
                            y[io * rows + r, T.Ramp(t * DOT4.lanes + hf * LANES, 1, LANES)] = T.Cast(
                                "float32x8",
                                T.Shuffle([acc[r * CHUNKS], acc[r * CHUNKS + 1]], EVEN)
                                + T.Shuffle([acc[r * CHUNKS], acc[r * CHUNKS + 1]], ODD)
                                - T.Broadcast(T.Cast("int32", x_zero_point[0]), LANES)
                                * w_colsum.vload([0, t * DOT4.lanes + hf * LANES], "int32x8"),
                            ) * w_scale.vload([0, t * DOT4.lanes + hf * LANES], "float32x8") * T.Broadcast(
                                x_scale[0], LANES)

    return gemm.with_attrs(dict(attrs.items()) if attrs is not None else {})
