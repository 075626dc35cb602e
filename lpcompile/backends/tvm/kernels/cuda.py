"""CUDA schedules of the kernels in `compute` (sm_80 .. sm_90).

The numerics are those of the shared compute definitions, checked on the CPU; these schedules
only map them onto threads. They are simple and correct, not tuned: no GPU speed is claimed
until one is measured on a GPU.

Matmul: one thread per output element (128 threads per block along N, so a warp reads
consecutive weight words), looping over K blocks; the decode is inlined (dequantized in
registers), the block partial sum is a register. Quantize kernels: one block per row, the
row's absolute maximum reduced across threads.
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir import Schedule

from lpcompile.backends.tvm.kernels.compute import KERNEL_ATTR, hadamard_stages, has_block

THREADS = 128
SHARED_BYTES = 48 * 1024  # static shared memory per block that every sm_80..sm_90 allows


def schedule_matmul(func: tirx.PrimFunc) -> tirx.PrimFunc:
    sch = Schedule(func)
    sch.compute_inline(sch.get_sblock("decode"))
    acc = sch.get_sblock("acc")
    y = sch.get_sblock("y") if has_block(sch, "y") else None  # accumulator_only kernels end with acc
    if y is None:
        m, b, n, kk = sch.get_loops(acc)
        bx, tx = sch.split(sch.fuse(m, b, n), [None, THREADS])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        return sch.mod["main"]
    if has_block(sch, "y_rows"):  # padded rows: a second kernel copies the real ones out
        out = sch.get_sblock("y")
        bo, to = sch.split(sch.fuse(*sch.get_loops(out)), [None, THREADS])
        sch.bind(bo, "blockIdx.x")
        sch.bind(to, "threadIdx.x")
        y = sch.get_sblock("y_rows")
    y_local = sch.cache_write(y, 0, "local")
    m, n, b = sch.get_loops(y)
    bx, tx = sch.split(sch.fuse(m, n), [None, THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.compute_at(acc, b)
    sch.set_scope(acc, 0, "local")
    sch.reverse_compute_at(y_local, tx)
    sch.decompose_reduction(y, b)
    # acc keeps its init inside the K loop (`if kk == 0`): with a symbolic m its row predicate
    # makes decompose_reduction refuse it, and the branch is uniform across the warp anyway.
    return sch.mod["main"]


def schedule_quantize_tensor(func: tirx.PrimFunc) -> tirx.PrimFunc:
    sch = Schedule(func)
    q = sch.get_sblock("quantize")
    bx, tx = sch.split(sch.fuse(*sch.get_loops(q)), [None, 256])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    return sch.mod["main"]


def schedule_elementwise(func: tirx.PrimFunc) -> tirx.PrimFunc:
    sch = Schedule(func)
    block = sch.get_sblock("elementwise")
    loops = sch.get_loops(block)
    if not loops:  # a scalar: one thread
        return sch.mod["main"]
    bx, tx = sch.split(sch.fuse(*loops) if len(loops) > 1 else loops[0], [None, 256])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    return sch.mod["main"]


def schedule_quantize_rows(func: tirx.PrimFunc) -> tirx.PrimFunc:
    sch = Schedule(func)
    amax = sch.get_sblock("amax")
    m, k = sch.get_loops(amax)
    sch.bind(m, "blockIdx.x")
    _, kt = sch.split(k, [None, THREADS])
    sch.bind(kt, "threadIdx.x")  # cross-thread max, lowered to a warp/shared-memory allreduce
    sch.set_scope(amax, 0, "shared")
    sch.reverse_compute_at(sch.get_sblock("row_scale"), m)
    q = sch.get_sblock("quantize")
    sch.reverse_compute_at(q, m)
    _, qt = sch.split(sch.get_loops(q)[-1], [None, THREADS])
    sch.bind(qt, "threadIdx.x")
    return sch.mod["main"]


def schedule_hadamard(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """One thread block per row, THREADS threads striding over the row; every stage but the
    last lives in shared memory (TVM's storage rewrite ping-pongs two row buffers and puts a
    barrier between stages), reductions (radix-16 step, dense factor) accumulate in a register.
    A row whose two buffers exceed SHARED_BYTES instead runs each stage as its own grid over
    all elements, through global memory."""
    n = int(func.attrs["lpcompile.n"])
    sch = Schedule(func)
    stages = []  # (block writing the stage's buffer, its reduction block or None)
    for name in hadamard_stages(sch):
        block = sch.get_sblock(name)
        if name in ("radix", "mix"):
            stages.append((sch.cache_write(block, 0, "local"), block))
        else:
            stages.append((block, None))

    def threads(reduction, loop):
        _, tx = sch.split(loop, [None, THREADS])
        sch.bind(tx, "threadIdx.x")
        if reduction is not None:
            sch.compute_at(reduction, tx)

    if 2 * 4 * n > SHARED_BYTES:
        for writer, reduction in stages:
            bx, tx = sch.split(sch.fuse(*sch.get_loops(writer)), [None, THREADS])
            sch.bind(bx, "blockIdx.x")
            sch.bind(tx, "threadIdx.x")
            if reduction is not None:
                sch.compute_at(reduction, tx)
        return sch.mod["main"]
    writer, reduction = stages[-1]
    row, j = sch.get_loops(writer)
    sch.bind(row, "blockIdx.x")
    threads(reduction, j)
    for writer, reduction in reversed(stages[:-1]):
        sch.compute_at(writer, row)
        sch.set_scope(writer, 0, "shared")
        threads(reduction, sch.get_loops(writer)[-1])
    return sch.mod["main"]


SCHEDULES = {
    "hadamard": schedule_hadamard,
    "quantized_matmul": schedule_matmul,
    "quantize_tensor": schedule_quantize_tensor,
    "quantize_rows": schedule_quantize_rows,
    "elementwise": schedule_elementwise,
}


def schedule(func: tirx.PrimFunc, target=None) -> tirx.PrimFunc:
    """A matmul as the CUDA rule list picks it (`rules.CUDA_RULES`: the tensor-core kernel for
    8-bit pairs in the dot4 layout, the split-K kernel for float x int4, else the generic
    schedule); other kernels (and matmuls without a target) by the generic schedule."""
    kind = str(func.attrs[KERNEL_ATTR])
    if kind == "quantized_matmul" and target is not None:
        from lpcompile.backends.tvm.kernels.rules import schedule_matmul

        return schedule_matmul(func, target)
    return SCHEDULES[kind](func)
