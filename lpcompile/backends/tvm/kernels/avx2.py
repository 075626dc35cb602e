"""Hand-written x86 AVX2 TIR for CPUs without AVX-512 VNNI (AMD Zen 2/3, older Intel): the
uint8 x int8 GEMM (W8A8) and the int8 x int4 GEMM/GEMV (W4A8) on the same dot4 weight layouts
as the VNNI kernels.

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

from lpcompile.backends.tvm.kernels.packing import DOT4, NIB8

PMADDWD = "llvm.x86.avx2.pmadd.wd"  # <16 x i16>, <16 x i16> -> <8 x i32>
PMADDUBSW = "llvm.x86.avx2.pmadd.ub.sw"  # <32 x u8>, <32 x s8> -> <16 x i16>, saturating
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


# --- int8 (per token) x int4 on AVX2 (W4A8, W4A4) --------------------------------------------------
# The arithmetic of `compute.quantized_matmul(m, K, N, weight="int4", activation="int8",
# block_size=B, dot4=True)`, the weights in `packing.NIB8` (unsigned nibbles u = w + 8). Here the
# saturating `vpmaddubsw` is exact: |u x| <= 15 * 128, so a pair sums to at most 3840, and the
# low- and high-nibble pairs of one 8-k step together to 7680 (int16). `vpmaddwd` with ones takes
# them to int32; per block the kernel subtracts 8 * sum(x) (the row's activations summed per
# block before the tile loop) and scales as the VNNI kernel does, so it is bit-identical to the
# generic schedule of the definition (a test checks it).


def applies_w4a8(func: tirx.PrimFunc, target: tvm.target.Target) -> bool:
    """Whether this GEMM takes `func` on `target` (the rule "avx2-w4a8-gemm" of `rules`)."""
    from lpcompile.backends.tvm.kernels.rules import applies as rule_applies

    return rule_applies("avx2-w4a8-gemm", func, target)


def w4a8_dot4_gemm(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The AVX2 GEMM (and GEMV: one row) for an int8 x int4 NIB8 definition."""
    attrs = func.attrs
    k, n, block = int(attrs["lpcompile.k"]), int(attrs["lpcompile.n"]), int(attrs["lpcompile.block"])
    m = func.params[0].shape[0]
    nb, qb, tiles = k // block, block // NIB8.group, n // NIB8.lanes
    rows = ROWS if not isinstance(m, tirx.IntImm) or int(m) >= ROWS else int(m)
    halves = NIB8.lanes // LANES  # 8-output halves of a 16-output weight tile
    offset = NIB8.offset

    @T.prim_func(private=True)
    def gemm(
        x: T.Buffer((m, k), "int8"),
        x_scale: T.Buffer((m,), "float32"),
        w: T.Buffer((tiles, k // NIB8.group, NIB8.lanes, 4), "uint8"),
        w_scale: T.Buffer((nb, n), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(tiles):
            for io in range((m + rows - 1) // rows):
                # per row and block: offset * sum(x), what the biased nibbles add (tail: the last row)
                xsum = T.decl_buffer((rows * nb,), "int32", scope="local")
                part = T.decl_buffer((1,), "int32", scope="local")
                for r in T.unroll(rows):
                    for b in range(nb):
                        part[0] = 0
                        for kk in range(block):
                            part[0] = part[0] + T.Cast("int32", x[T.min(io * rows + r, m - 1), b * block + kk])
                        xsum[r * nb + b] = part[0] * offset
                y_acc = T.decl_buffer((rows * halves,), "float32x8", scope="local")
                acc = T.decl_buffer((rows * halves,), "int32x8", scope="local")
                for i in T.unroll(rows * halves):
                    y_acc[i] = T.Broadcast(T.float32(0), LANES)
                for b in range(nb):
                    for i in T.unroll(rows * halves):
                        acc[i] = T.Broadcast(T.int32(0), LANES)
                    for q in range(qb):
                        for hf in T.unroll(halves):
                            for r in T.unroll(rows):
                                acc[r * halves + hf] = acc[r * halves + hf] + T.call_llvm_pure_intrin(
                                    "int32x8", T.llvm_lookup_intrinsic_id(PMADDWD),
                                    T.call_llvm_pure_intrin(
                                        "int16x16", T.llvm_lookup_intrinsic_id(PMADDUBSW),
                                        # low nibbles: k 8q..8q+3 of the half's 8 outputs
                                        T.bitwise_and(w.vload([t, b * qb + q, hf * LANES, 0], "uint8x32"),
                                                      T.Broadcast(T.uint8(15), 32)),
                                        T.reinterpret("int8x32", T.Broadcast(T.reinterpret("int32", x.vload(
                                            [T.min(io * rows + r, m - 1), (b * qb + q) * 8], "int8x4")), LANES)))
                                    + T.call_llvm_pure_intrin(
                                        "int16x16", T.llvm_lookup_intrinsic_id(PMADDUBSW),
                                        # high nibbles: k 8q+4..8q+7
                                        T.shift_right(w.vload([t, b * qb + q, hf * LANES, 0], "uint8x32"),
                                                      T.Broadcast(T.uint8(4), 32)),
                                        T.reinterpret("int8x32", T.Broadcast(T.reinterpret("int32", x.vload(
                                            [T.min(io * rows + r, m - 1), (b * qb + q) * 8 + 4], "int8x4")), LANES))),
                                    T.Broadcast(T.int16(1), 16))
                    for r in T.unroll(rows):
                        for hf in T.unroll(halves):
                            y_acc[r * halves + hf] = y_acc[r * halves + hf] + T.Cast(
                                "float32x8", acc[r * halves + hf] - T.Broadcast(xsum[r * nb + b], LANES)
                            ) * w_scale.vload([b, t * NIB8.lanes + hf * LANES], "float32x8") * T.Broadcast(
                                x_scale[T.min(io * rows + r, m - 1)], LANES)
                for r in T.unroll(rows):
                    if io * rows + r < m:
                        for hf in T.unroll(halves):
                            y[io * rows + r, T.Ramp(t * NIB8.lanes + hf * LANES, 1, LANES)] = y_acc[r * halves + hf]

    return gemm.with_attrs(dict(attrs.items()) if attrs is not None else {})
