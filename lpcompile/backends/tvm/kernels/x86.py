"""Hand-scheduled x86 AVX-512 TIR for the hottest kernel: the int4 x fp32 GEMV (one token).

The kernel computes exactly the arithmetic of `compute.quantized_matmul(1, K, N, weight="int4")`
in the same order (per K block: acc += x[k] * q[k, n] with fused multiply-adds, k ascending;
then y += acc * w_scale[b, n], b ascending), so it is bit-identical to the generic schedule of
that definition (a test checks this) and differs only in how a nibble becomes a float:

    generic schedule:  shift left, arithmetic shift right, int -> float convert   (3 vector ops)
    here:              logical shift right, 16-entry in-register table lookup
                       (vpermps: it reads only the low 4 bits of each lane)         (2 ops; 1 for h = 0)

Decoding is the bottleneck of this memory-light loop: measured on this host (Zen 5, warm weights,
4096 x 4096, 2 threads) 96 us against 171 us for the generic schedule. TVM's vectorizer cannot
produce a variable in-register permute from a scalar table lookup, so this loop is written with
explicit 16-lane vectors; the rule list (`rules.CPU_RULES`) picks it only where it applies (AVX-512, M = 1,
N a multiple of 128, K a multiple of the block), the generic schedule everywhere else.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script import tirx as T

from lpcompile.backends.tvm.kernels.packing import NIB8, NIBBLE

K_UNROLL = 4
LANES = 16
PERMUTE = "llvm.x86.avx512.permvar.sf.512"


def applies(func: tirx.PrimFunc, target: tvm.target.Target) -> bool:
    """Whether this GEMV takes `func` on `target` (the rule "avx512-int4-gemv" of `rules`)."""
    from lpcompile.backends.tvm.kernels.rules import applies as rule_applies

    return rule_applies("avx512-int4-gemv", func, target)


def int4_gemv(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The AVX-512 GEMV for a `quantized_matmul(1, K, N, weight="int4", ...)` definition."""
    attrs = func.attrs
    k, n, block = int(attrs["lpcompile.k"]), int(attrs["lpcompile.n"]), int(attrs["lpcompile.block"])
    tiles, nb, per = n // NIBBLE.tile, k // block, NIBBLE.per_word
    ko_n = block // K_UNROLL
    shapes = [tuple(int(d) for d in p.shape) for p in func.params]

    @T.prim_func(private=True)
    def gemv(
        x: T.Buffer(shapes[0], "float32"),
        w: T.Buffer(shapes[1], "uint32"),
        w_scale: T.Buffer(shapes[2], "float32"),
        y: T.Buffer(shapes[3], "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        lane = T.Ramp(0, 1, LANES)
        # nibble code -> its signed value: 0..7 -> 0..7, 8..15 -> -8..-1
        table = T.Cast("float32x16", T.Select(lane < T.Broadcast(8, LANES), lane, lane - T.Broadcast(16, LANES)))
        for t in T.parallel(tiles):
            y_acc = T.decl_buffer((NIBBLE.tile,), "float32", scope="local")
            acc = T.decl_buffer((NIBBLE.tile,), "float32", scope="local")
            for h in T.unroll(per):
                y_acc[T.Ramp(h * LANES, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
            for b in range(nb):
                for h in T.unroll(per):
                    acc[T.Ramp(h * LANES, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
                for ko in range(ko_n):
                    for ki in T.unroll(K_UNROLL):
                        kk = b * block + ko * K_UNROLL + ki
                        xv = T.Broadcast(x[0, kk], LANES)
                        words = w.vload([t, kk, 0], "uint32x16")
                        for h in T.unroll(per):
                            idx = T.reinterpret("int32x16", T.shift_right(words, T.Broadcast(T.uint32(4 * h), LANES)))
                            q = T.call_llvm_pure_intrin("float32x16", T.llvm_lookup_intrinsic_id(PERMUTE), table, idx)
                            acc[T.Ramp(h * LANES, 1, LANES)] = acc.vload([h * LANES], "float32x16") + xv * q
                for h in T.unroll(per):
                    y_acc[T.Ramp(h * LANES, 1, LANES)] = y_acc.vload([h * LANES], "float32x16") + acc.vload(
                        [h * LANES], "float32x16"
                    ) * w_scale.vload([b, t * NIBBLE.tile + h * LANES], "float32x16")
            for h in T.unroll(per):
                y[0, T.Ramp(t * NIBBLE.tile + h * LANES, 1, LANES)] = y_acc.vload([h * LANES], "float32x16")

    return gemv.with_attrs(dict(attrs.items()) if attrs is not None else {})


# --- uint8 x int8 GEMM on AVX-512 VNNI -------------------------------------------------------------
# TVM 0.27's `tensorize` crashes the process (a segfault, even on the minimal VNNI example of its
# own intrinsic table), so the `vpdpbusd` micro-kernel is written out like the GEMV above. It
# computes the arithmetic of `compute.quantized_matmul(m, K, N, weight="int8",
# activation="uint8", dot4=True)` (per-channel scales: one K block): exact int32 sums, then
# (float(acc - x_zero_point * w_colsum) * w_scale) * x_scale, the same order, so it is
# bit-identical to the generic schedule of that definition (a test checks it).

VNNI = "llvm.x86.avx512.vpdpbusd.512"
ROWS = 4  # rows per micro-tile
VECS = 4  # 16-lane output vectors per micro-tile: 4 x 4 int32x16 accumulators in registers


def applies_dot4(func: tirx.PrimFunc, target: tvm.target.Target) -> bool:
    """Whether this GEMM takes `func` on `target` (the rule "vnni-u8s8-gemm" of `rules`)."""
    from lpcompile.backends.tvm.kernels.rules import applies as rule_applies

    return rule_applies("vnni-u8s8-gemm", func, target)


def u8s8_dot4_gemm(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The VNNI GEMM for a dot4 uint8 x int8 definition (rows static or symbolic)."""
    attrs = func.attrs
    k, n = int(attrs["lpcompile.k"]), int(attrs["lpcompile.n"])
    m = func.params[0].shape[0]  # an IntImm or the definition's own symbolic row count
    kq, tiles = k // 4, n // (LANES * VECS)
    rows = ROWS if not isinstance(m, tirx.IntImm) or int(m) >= ROWS else int(m)  # (one token: no repeats)

    @T.prim_func(private=True)
    def gemm(
        x: T.Buffer((m, k), "uint8"),
        x_scale: T.Buffer((1,), "float32"),
        x_zero_point: T.Buffer((1,), "uint8"),
        w: T.Buffer((n // LANES, kq, LANES, 4), "int8"),
        w_scale: T.Buffer((1, n), "float32"),
        w_colsum: T.Buffer((1, n), "int32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(tiles):
            for io in range((m + rows - 1) // rows):
                acc = T.decl_buffer((rows * VECS,), "int32x16", scope="local")
                for r in T.unroll(rows):
                    for v in T.unroll(VECS):
                        acc[r * VECS + v] = T.Broadcast(T.int32(0), LANES)
                # 16 accumulators; per 4 values of k: 4 weight rows, 4 activation broadcasts
                for q in range(kq):
                    for v in T.unroll(VECS):
                        for r in T.unroll(rows):
                            acc[r * VECS + v] = T.call_llvm_pure_intrin(
                                "int32x16", T.llvm_lookup_intrinsic_id(VNNI), acc[r * VECS + v],
                                # 4 activation bytes of the row, broadcast (the tail re-reads the last row)
                                T.reinterpret("int8x64", T.Broadcast(T.reinterpret("int32", x.vload(
                                    [T.min(io * rows + r, m - 1), q * 4], "uint8x4")), LANES)),
                                w.vload([t * VECS + v, q, 0, 0], "int8x64"))  # (this LLVM's vpdpbusd takes bytes)
                for r in T.unroll(rows):
                    if io * rows + r < m:
                        for v in T.unroll(VECS):
                            y[io * rows + r, T.Ramp((t * VECS + v) * LANES, 1, LANES)] = T.Cast(
                                "float32x16",
                                acc[r * VECS + v] - T.Broadcast(T.Cast("int32", x_zero_point[0]), LANES)
                                * w_colsum.vload([0, (t * VECS + v) * LANES], "int32x16"),
                            ) * w_scale.vload([0, (t * VECS + v) * LANES], "float32x16") * T.Broadcast(x_scale[0], LANES)

    return gemm.with_attrs(dict(attrs.items()) if attrs is not None else {})


# --- int8 (per token) x int4 GEMM/GEMV on AVX-512 VNNI (W4A8, W4A4) --------------------------------
# The arithmetic of `compute.quantized_matmul(m, K, N, weight="int4", activation="int8",
# block_size=B, dot4=True)`: per K block the exact int32 sum of x * w, then
# y = sum over blocks of (float(acc_b) * w_scale[b]) * x_scale[row], in that order (bit-identical
# to the generic schedule; a test checks it). The weights come biased to unsigned nibbles (NIB8):
# vpdpbusd(acc, u, x) sums u * x = (w + 8) * x, and 8 * sum(x), accumulated alongside with a vector
# of ones, is taken out per block.


def applies_w4a8(func: tirx.PrimFunc, target: tvm.target.Target) -> bool:
    """Whether this GEMM takes `func` on `target` (the rule "vnni-w4a8-gemm" of `rules`)."""
    from lpcompile.backends.tvm.kernels.rules import applies as rule_applies

    return rule_applies("vnni-w4a8-gemm", func, target)


def w4a8_dot4_gemm(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The VNNI GEMM (and GEMV: one row) for an int8 x int4 NIB8 definition."""
    attrs = func.attrs
    k, n, block = int(attrs["lpcompile.k"]), int(attrs["lpcompile.n"]), int(attrs["lpcompile.block"])
    m = func.params[0].shape[0]
    nb, qb, tiles = k // block, block // 8, n // (LANES * VECS)
    rows = ROWS if not isinstance(m, tirx.IntImm) or int(m) >= ROWS else int(m)
    offset = NIB8.offset  # u = w + offset: sum u x - offset sum x = sum w x

    @T.prim_func(private=True)
    def gemm(
        x: T.Buffer((m, k), "int8"),
        x_scale: T.Buffer((m,), "float32"),
        w: T.Buffer((n // LANES, k // 8, LANES, 4), "uint8"),
        w_scale: T.Buffer((nb, n), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(tiles):
            for io in range((m + rows - 1) // rows):
                y_acc = T.decl_buffer((rows * VECS,), "float32x16", scope="local")
                acc = T.decl_buffer((rows * VECS,), "int32x16", scope="local")
                xsum = T.decl_buffer((rows,), "int32x16", scope="local")
                for i in T.unroll(rows * VECS):
                    y_acc[i] = T.Broadcast(T.float32(0), LANES)
                for b in range(nb):
                    for i in T.unroll(rows * VECS):
                        acc[i] = T.Broadcast(T.int32(0), LANES)
                    for r in T.unroll(rows):
                        xsum[r] = T.Broadcast(T.int32(0), LANES)
                    for q in range(qb):
                        for h in T.unroll(2):  # low nibbles: k 8q..8q+3, high: 8q+4..8q+7
                            for r in T.unroll(rows):
                                # 4 activations of the row, broadcast (the tail re-reads the last row)
                                xsum[r] = T.call_llvm_pure_intrin(
                                    "int32x16", T.llvm_lookup_intrinsic_id(VNNI), xsum[r],
                                    T.Broadcast(T.uint8(1), 64),
                                    T.reinterpret("int8x64", T.Broadcast(T.reinterpret("int32", x.vload(
                                        [T.min(io * rows + r, m - 1), (b * qb + q) * 8 + h * 4], "int8x4")), LANES)))
                                for v in T.unroll(VECS):
                                    acc[r * VECS + v] = T.call_llvm_pure_intrin(
                                        "int32x16", T.llvm_lookup_intrinsic_id(VNNI), acc[r * VECS + v],
                                        T.bitwise_and(T.shift_right(w.vload([t * VECS + v, b * qb + q, 0, 0], "uint8x64"),
                                                                    T.Broadcast(T.uint8(4 * h), 64)),
                                                      T.Broadcast(T.uint8(15), 64)),
                                        T.reinterpret("int8x64", T.Broadcast(T.reinterpret("int32", x.vload(
                                            [T.min(io * rows + r, m - 1), (b * qb + q) * 8 + h * 4], "int8x4")), LANES)))
                    for r in T.unroll(rows):
                        for v in T.unroll(VECS):
                            y_acc[r * VECS + v] = y_acc[r * VECS + v] + T.Cast(
                                "float32x16", acc[r * VECS + v] - xsum[r] * T.Broadcast(offset, LANES)
                            ) * w_scale.vload([b, (t * VECS + v) * LANES], "float32x16") * T.Broadcast(
                                x_scale[T.min(io * rows + r, m - 1)], LANES)
                for r in T.unroll(rows):
                    if io * rows + r < m:
                        for v in T.unroll(VECS):
                            y[io * rows + r, T.Ramp((t * VECS + v) * LANES, 1, LANES)] = y_acc[r * VECS + v]

    return gemm.with_attrs(dict(attrs.items()) if attrs is not None else {})
