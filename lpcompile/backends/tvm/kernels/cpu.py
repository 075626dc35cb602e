"""CPU (LLVM) schedules of the kernels in `compute`: vectorized over N, parallel over N tiles.

GEMV (one row): the weight decode is inlined into the inner loop, so each weight is loaded,
decoded in registers and used once; per N tile the loop runs over K blocks, keeping the 128
block partial sums (8 AVX-512 vectors) and the 128 outputs in registers; the block scale is
applied once per block.

GEMM (several or a symbolic number of rows): per (N tile of 64, K block) the decoded weights
(128 x 64 fp32, 32 KiB: L1) are materialised once and reused by every 4-row micro-tile, whose
4 x 64 partial sums live in 16 vector registers.
"""

from __future__ import annotations

import math

import tvm
from tvm import tirx
from tvm.s_tir import Schedule

from lpcompile.backends.tvm.kernels.compute import KERNEL_ATTR, RADIX, hadamard_stages, has_block

K_UNROLL = 4
M_TILE = 4
N_SUB = 64
LANES = 16  # fp32 lanes of an AVX-512 vector
ACC_VECTORS = 16  # accumulator vectors of the Hadamard's dense factor (of 32 AVX-512 registers)


def _attr(func: tirx.PrimFunc, key: str):
    return func.attrs[key] if func.attrs is not None and key in func.attrs else None


def _rows(func: tirx.PrimFunc):
    m = func.params[0].shape[0]  # TVM 0.27: params are the buffers
    return int(m) if isinstance(m, tirx.IntImm) else None


def schedule_matmul(func: tirx.PrimFunc) -> tirx.PrimFunc:
    if _rows(func) == 1:
        return _gemv(func)
    return _gemm(func)


def _gemv(func: tirx.PrimFunc) -> tirx.PrimFunc:
    tile, lanes = int(_attr(func, "lpcompile.tile_n")), int(_attr(func, "lpcompile.lanes"))
    per = tile // lanes
    sch = Schedule(func)
    sch.compute_inline(sch.get_sblock("decode"))
    acc = sch.get_sblock("acc")
    y = sch.get_sblock("y") if has_block(sch, "y") else None
    if y is None:  # accumulator_only: acc is the output
        return _gemv_acc_only(sch, acc, per, lanes)
    y_local = sch.cache_write(y, 0, "local")
    m, n, b = sch.get_loops(y)
    no, nh, nl = sch.split(n, [None, per, lanes])
    sch.reorder(m, no, b, nh, nl)
    sch.parallel(no)
    sch.vectorize(nl)
    sch.compute_at(acc, b)
    _, _, kk = sch.get_loops(acc)[-3:]
    an = sch.get_loops(acc)[-2]
    anh, anl = sch.split(an, [per, lanes])
    ko, ki = sch.split(kk, [None, K_UNROLL])
    sch.reorder(ko, ki, anh, anl)
    sch.unroll(ki)
    sch.unroll(anh)
    sch.vectorize(anl)
    sch.set_scope(acc, 0, "local")
    sch.decompose_reduction(acc, ko)
    sch.reverse_compute_at(y_local, no)
    sch.vectorize(sch.get_loops(y_local)[-1])
    sch.decompose_reduction(y, b)
    return sch.mod["main"]


def _gemv_acc_only(sch: Schedule, acc, per: int, lanes: int) -> tirx.PrimFunc:
    m, b, n, kk = sch.get_loops(acc)
    no, nh, nl = sch.split(n, [None, per, lanes])
    ko, ki = sch.split(kk, [None, K_UNROLL])
    sch.reorder(m, no, b, ko, ki, nh, nl)
    sch.parallel(no)
    sch.unroll(ki)
    sch.vectorize(nl)
    sch.decompose_reduction(acc, ko)
    return sch.mod["main"]


def _gemm(func: tirx.PrimFunc) -> tirx.PrimFunc:
    sch = Schedule(func)
    decode, acc = sch.get_sblock("decode"), sch.get_sblock("acc")
    if not has_block(sch, "y"):
        return _gemm_acc_only(sch, decode, acc)
    y = sch.get_sblock("y_rows") if has_block(sch, "y_rows") else sch.get_sblock("y")
    if has_block(sch, "y_rows"):  # padded rows: copy the real ones out, in parallel
        out = sch.get_sblock("y")
        om, on = sch.get_loops(out)
        sch.parallel(om)
        sch.vectorize(sch.split(on, [None, 16])[1])
    m, n, b = sch.get_loops(y)
    no, ni = sch.split(n, [None, N_SUB])
    mo, mi = sch.split(m, [None, M_TILE])
    sch.reorder(no, b, mo, mi, ni)
    sch.parallel(no)
    sch.vectorize(ni)
    # acc for a 4 x 64 micro-tile, k outermost, in registers
    sch.compute_at(acc, mo)
    am, an, kk = sch.get_loops(acc)[-3:]  # the unit K-block loop is dropped by compute_at
    anh, anl = sch.split(an, [None, 16])
    sch.reorder(kk, am, anh, anl)
    sch.unroll(am)
    sch.unroll(anh)
    sch.vectorize(anl)
    sch.set_scope(acc, 0, "local")
    sch.decompose_reduction(acc, kk)
    # decoded weights for (N tile, K block): once, reused by every row tile
    sch.compute_at(decode, b)
    sch.set_scope(decode, 0, "local")
    dk, dn = sch.get_loops(decode)[-2:]
    dno, dni = sch.split(dn, [None, 16])
    sch.vectorize(dni)
    sch.decompose_reduction(y, b)
    return sch.mod["main"]


def _gemm_acc_only(sch: Schedule, decode, acc) -> tirx.PrimFunc:
    sch.compute_inline(decode)
    m, b, n, kk = sch.get_loops(acc)
    no, ni = sch.split(n, [None, 16])
    sch.reorder(no, m, b, kk, ni)
    sch.parallel(no)
    sch.vectorize(ni)
    sch.decompose_reduction(acc, kk)
    return sch.mod["main"]


# Byte-output kernels leave the inner loop to LLVM's vectorizer: TVM 0.27's explicit 16-lane
# vectorization of a float -> uint8/int8 store comes out as gathers and 16 single-byte stores
# (measured: the per-tensor quantizer of a 512 x 2816 activation, 1.04 ms -> 0.10 ms).


def schedule_quantize_tensor(func: tirx.PrimFunc) -> tirx.PrimFunc:
    sch = Schedule(func)
    q = sch.get_sblock("quantize")
    m, _ = sch.get_loops(q)
    sch.parallel(m)
    return sch.mod["main"]


def schedule_elementwise(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """One loop over every element: parallel chunks, vectorized inside."""
    sch = Schedule(func)
    block = sch.get_sblock("elementwise")
    loops = sch.get_loops(block)
    if not loops:
        return sch.mod["main"]
    outer, inner = sch.split(sch.fuse(*loops) if len(loops) > 1 else loops[0], [None, 64])
    sch.parallel(outer)  # (the inner 64 vectorized by LLVM: byte outputs, see above)
    return sch.mod["main"]


def schedule_quantize_rows(func: tirx.PrimFunc) -> tirx.PrimFunc:
    sch = Schedule(func)
    amax = sch.get_sblock("amax")
    m, k = sch.get_loops(amax)
    sch.parallel(m)
    sch.reverse_compute_at(sch.get_sblock("row_scale"), m)
    q = sch.get_sblock("quantize")
    sch.reverse_compute_at(q, m)  # (its inner loop vectorized by LLVM: byte output, see above)
    return sch.mod["main"]


def schedule_hadamard(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Rows in parallel; per row every stage is computed into a row buffer (L1/L2-resident) and
    vectorized over 16 contiguous lanes: the sign flips as one multiply, the radix-16 step as 16
    FMAs of a broadcast input with a constant ±1 lane vector, each butterfly stage as contiguous
    vector adds (the ± half of a 2h-span is a loop index, unrolled), the dense factor as a
    register-blocked small matmul
    (up to 4 output groups × 16 vectors of a group's t·u lanes accumulate in registers over q)."""
    t, m = int(_attr(func, "lpcompile.sylvester")), int(_attr(func, "lpcompile.dense"))
    u, span, n = int(_attr(func, "lpcompile.inner")), int(_attr(func, "lpcompile.span")), int(_attr(func, "lpcompile.n"))
    group = t * u
    lanes = math.gcd(group, LANES)
    sch = Schedule(func)
    names = hadamard_stages(sch)
    row = sch.get_loops(sch.get_sblock(names[-1]))[0]
    sch.parallel(row)
    for name in reversed(names[:-1]):
        block = sch.get_sblock(name)
        sch.compute_at(block, row)
        sch.set_scope(block, 0, "local")
    r = min(t, RADIX) if u == 1 else 1
    for name in names:
        block = sch.get_sblock(name)
        if name == "signed":
            sch.vectorize(sch.split(sch.get_loops(block)[-1], [None, math.gcd(n, LANES)])[1])
        elif name == "radix":
            if r == 1:  # no low Sylvester stages (blocks 12, 20, ...; across heads): x · signs / √t
                sch.vectorize(sch.split(sch.get_loops(block)[-1], [None, math.gcd(n, LANES)])[1])
                continue
            j, q = sch.get_loops(block)[-2:]
            jo, jl = sch.split(j, [None, r])
            sch.reorder(jo, q, jl)
            sch.unroll(q)
            sch.vectorize(jl)
            sch.decompose_reduction(block, q)
        elif name == "mix":
            out = sch.cache_write(block, 0, "local")
            j, q = sch.get_loops(block)[-2:]
            g, jj = sch.split(j, [None, group])
            vectors = min(group // lanes, ACC_VECTORS)  # of a group's lanes, kept in registers at once
            tile = next(d for d in (4, 2, 1) if m % d == 0 and d * vectors <= ACC_VECTORS)
            go, gi = sch.split(g, [None, tile])
            jc, jo, jl = sch.split(jj, [None, vectors, lanes])
            sch.reorder(go, jc, q, gi, jo, jl)
            sch.unroll(gi)
            sch.unroll(jo)
            sch.vectorize(jl)
            sch.reverse_compute_at(out, jc)
            sch.vectorize(sch.split(sch.get_loops(out)[-1], [None, lanes])[1])
            sch.decompose_reduction(block, q)
        else:
            h = span << int(name.removeprefix("butterfly"))
            _, half, jl = sch.split(sch.get_loops(block)[-1], [None, 2, h])
            sch.unroll(half)
            sch.vectorize(sch.split(jl, [None, math.gcd(h, LANES)])[1])
    return sch.mod["main"]


SCHEDULES = {
    "hadamard": schedule_hadamard,
    "quantized_matmul": schedule_matmul,
    "quantize_tensor": schedule_quantize_tensor,
    "quantize_rows": schedule_quantize_rows,
    "elementwise": schedule_elementwise,
}


def schedule(func: tirx.PrimFunc, target: tvm.target.Target, generic_only: bool = False) -> tirx.PrimFunc:
    """The kernel for an LLVM target: a matmul as the CPU rule list picks it (`rules.CPU_RULES`:
    a hand-scheduled ISA-specific kernel where one applies, first that applies wins), everything
    else (and everything with `generic_only`) by the generic schedule of its compute definition."""
    kind = str(_attr(func, KERNEL_ATTR))
    if kind == "quantized_matmul" and not generic_only:
        from lpcompile.backends.tvm.kernels.rules import schedule_matmul

        return schedule_matmul(func, target)
    return SCHEDULES[kind](func)
