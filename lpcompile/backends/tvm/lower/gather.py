"""Embedding tables: `Gather(DequantizeLinear(constant table), indices, axis=0)` keeps the table
low-bit and dequantizes only the gathered rows (`_gather_rows`); `_gather_refusal` says why a
table keeps the stock float gather."""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as ox

from lpcompile.backends.tvm.kernels.compute import FLOAT8
from lpcompile.backends.tvm.lower.context import _ACTIVE, ConstantDequantize, _Context
from lpcompile.backends.tvm.lower.exprs import _flatten_rows, _node_name, _shape
from lpcompile.backends.tvm.lower.qdq import _decode_kernel


class Gather(ox.Gather):
    """Gather(DequantizeLinear(constant table), indices, axis=0) (embedding tables): the table
    stays low-bit (4-bit codes two per byte, 8-bit integer and float8 as is) with its scales and zero points; the
    rows are gathered first and only they are dequantized, exactly as ONNX computes them."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        ctx = _ACTIVE.get()
        data, indices = inputs[0], inputs[1]
        w = ctx.weights.get(data)
        if w is None:
            return super()._impl_v13(bb, inputs, attr, params)
        node = _node_name(attr)
        reason = _gather_refusal(w, int(attr.get("axis", 0)))
        if reason is not None or not isinstance(getattr(indices, "ty", None), relax.TensorType):
            ctx.report.refuse("Gather", reason or "indices are not a tensor", node)
            return super()._impl_v13(bb, inputs, attr, params)
        out = _gather_rows(ctx, w, indices)
        ctx.report.fired[f"Gather[{w.dtype}]"] += 1
        if node is not None:
            ctx.report.layers[node] = {"kernel": f"gather {w.dtype} rows, dequantized after the gather",
                                       "activation": "float32", "status": "native", "reason": None}
        return out


_GATHER_DTYPES = ("int4", "uint4", "int8", "uint8", *FLOAT8)


def _gather_refusal(w: ConstantDequantize, axis: int) -> str | None:
    if axis != 0 or w.q.ndim != 2:
        return "only axis-0 gathers from 2-D tables keep their low-bit form"
    if w.dtype not in _GATHER_DTYPES:
        return f"no low-bit gather for {w.dtype} tables"
    v, d = w.q.shape
    if w.dtype in ("int4", "uint4") and d % 2:
        return "4-bit tables need an even row length"
    if w.scale.size != 1:
        axis_w = w.axis % 2
        if w.block_size and (axis_w != 1 or d % w.block_size):
            return "blocked tables need blocks along the row that divide it"
    return None


def _gather_rows(ctx: _Context, w: ConstantDequantize, indices: relax.Expr) -> relax.Expr:
    bb, op = ctx.bb, relax.op
    v, d = w.q.shape
    four = w.dtype in ("int4", "uint4")
    if four:
        u = (w.q.astype(np.int16) & 15).astype(np.uint8)
        codes = relax.const(u[:, 0::2] | (u[:, 1::2] << 4))  # [V, D/2]
    else:
        codes = relax.const(w.q)
    idx_dtype = str(indices.ty.dtype)
    indices = bb.emit(op.where(op.less(indices, relax.const(0, idx_dtype)),
                               op.add(indices, relax.const(v, idx_dtype)), indices))
    # mode clip: an out-of-range id reads an edge row instead of reading out of bounds
    rows = bb.emit(op.take(codes, indices, axis=0, mode="clip"))  # [..., D or D/2]
    lead = _shape(rows)[:-1]
    if four:
        lo = op.bitwise_and(rows, relax.const(np.uint8(15)))
        hi = op.right_shift(rows, relax.const(np.uint8(4)))
        rows = bb.emit(op.reshape(op.stack([lo, hi], axis=-1), [*lead, d]))
    if w.dtype in FLOAT8:  # the codes of the gathered rows only, decoded in integer arithmetic
        flat, _, _ = _flatten_rows(bb, rows)
        gv = ctx.kernel(("decode", w.dtype, d), lambda: _decode_kernel(d, w.dtype))
        q = bb.emit(ctx.call(gv, [flat], relax.TensorType(_shape(flat), "float32")))
        q = bb.emit(op.reshape(q, [*lead, d]))
    else:
        q = bb.emit(op.astype(rows, "float32"))
    if w.dtype == "int4":  # sign of the 4-bit two's complement code
        q = bb.emit(op.where(op.greater_equal(q, relax.const(np.float32(8))), op.subtract(q, relax.const(np.float32(16))), q))
    scale = w.scale.astype(np.float32)
    zp = None if w.zero_point is None else w.zero_point
    if scale.size == 1:
        s = relax.const(scale.reshape(()))
        z = None if zp is None else relax.const(zp.astype(np.float32).reshape(()))
        y = op.multiply(op.subtract(q, z) if z is not None else q, s)
        return bb.emit(y)
    axis = w.axis % 2
    if not w.block_size and axis == 1:  # one scale per column
        s = relax.const(scale.reshape(d))
        z = None if zp is None else relax.const(zp.astype(np.float32).reshape(d))
        return bb.emit(op.multiply(op.subtract(q, z) if z is not None else q, s))
    if not w.block_size:  # one scale per row: gathered with the rows
        s = bb.emit(op.expand_dims(op.take(relax.const(scale.reshape(v)), indices, axis=0, mode="clip"), [-1]))
        z = None if zp is None else bb.emit(op.expand_dims(op.astype(op.take(relax.const(zp.reshape(v)), indices, axis=0, mode="clip"), "float32"), [-1]))
        return bb.emit(op.multiply(op.subtract(q, z) if z is not None else q, s))
    b = w.block_size  # blocks along the row: [V, D/B] scales gathered with the rows
    nb = d // b
    s = bb.emit(op.expand_dims(op.take(relax.const(scale.reshape(v, nb)), indices, axis=0, mode="clip"), [-1]))
    q = bb.emit(op.reshape(q, [*lead, nb, b]))
    if zp is not None:
        z = bb.emit(op.expand_dims(op.astype(op.take(relax.const(zp.reshape(v, nb)), indices, axis=0, mode="clip"), "float32"), [-1]))
        q = bb.emit(op.subtract(q, z))
    return bb.emit(op.reshape(op.multiply(q, s), [*lead, d]))
