"""The online Hadamard transform: `ai.lpcompile::Hadamard(x, a, s)` (written by the rotate pass)
on the fast Walsh–Hadamard kernel when its factors allow (`_fast_hadamard`, with the rotation's
sign flips fused in: `_channel_scale`), else as dense Relax matmuls (`_dense_hadamard`)."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as ox
from tvm.sym.analyzer import Analyzer  # tvm.arith in older TVM

from lpcompile.backends.tvm import kernels as K
from lpcompile.backends.tvm.lower.context import _ACTIVE, _Context
from lpcompile.backends.tvm.lower.exprs import _const_array, _flatten_rows, _shape, _static


class Hadamard(ox.OnnxOpConverter):
    """`ai.lpcompile::Hadamard(x, a, s)`: x · diag(a⊗s, ...) over the last axis.

    With constant factors where s is the orthonormal Sylvester matrix (what the rotate pass
    writes, `kron_factors`) or an identity (its cross-head transform, a ⊗ I): one call_tir to
    the fast Walsh–Hadamard kernel
    (`hadamard_transform`: O(n log t) butterflies, then the small dense factor a; a Sylvester a
    joins the butterflies), with a preceding per-channel constant multiply (the randomized
    Hadamard's sign flips) fused into it. Anything else: aᵀ·X·s on each block viewed as
    [m, t] with Relax matmuls (exact, slower)."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        ctx = _ACTIVE.get()
        x, a, s = inputs
        fast = _fast_hadamard(ctx, x, a, s)
        if fast is not None:
            ctx.report.fired["Hadamard[fwht]"] += 1
            return fast
        x2, rows, shape = _flatten_rows(bb, x)
        m, t = int(_shape(a)[0]), int(_shape(s)[0])
        n = _static(shape[-1])
        blocks = n // (m * t)
        ctx.report.fired["Hadamard[dense factors]"] += 1
        return _dense_hadamard(bb, x2, rows, shape, a, s, blocks)


def _dense_hadamard(bb, x2, rows, shape, a, s, blocks):
    m, t = int(_shape(a)[0]), int(_shape(s)[0])
    n = m * t * blocks
    z = bb.emit(relax.op.matmul(relax.op.reshape(x2, [rows, blocks, m, t]), s))
    z = bb.emit(relax.op.matmul(relax.op.permute_dims(z, [0, 1, 3, 2]), a))
    y = bb.emit(relax.op.reshape(relax.op.permute_dims(z, [0, 1, 3, 2]), [rows, n]))
    return y if len(shape) == 2 else bb.emit(relax.op.reshape(y, shape))


def _fast_hadamard(ctx: _Context, x, a, s) -> relax.Expr | None:
    """The Hadamard op on the fast kernel, or None (with the reason in the report)."""
    from lpcompile.ir.hadamard import hadamard

    ca, cs = _const_array(ctx, a), _const_array(ctx, s)
    if ca is None or cs is None:
        ctx.report.refuse("Hadamard", "factors are not constants: dense factors instead")
        return None
    a_np, s_np = ca[1].astype(np.float64), cs[1].astype(np.float64)
    ty = getattr(x, "ty", None)
    known = isinstance(ty, relax.TensorType) and ty.shape is not None and str(ty.dtype) == "float32"
    n = _static(_shape(x)[-1]) if known else None
    m, t = (a_np.shape[0], s_np.shape[0]) if a_np.ndim == 2 and s_np.ndim == 2 else (0, 0)
    if n is None or not m or not t or n % (m * t):
        ctx.report.refuse("Hadamard", "needs float32 x with a static last dimension divisible by the block: dense factors instead")
        return None
    sylvester_a = not m & (m - 1) and np.allclose(a_np, hadamard(m), atol=1e-6)
    if np.array_equal(s_np, np.eye(t)):  # a ⊗ I_t: across heads of t channels (rotate's cross_head)
        m, t, u = (1, m, t) if sylvester_a else (m, 1, t)
    elif not t & (t - 1) and np.allclose(s_np, hadamard(t), atol=1e-6):
        m, t, u = (1, m * t, 1) if sylvester_a else (m, t, 1)  # Sylvester ⊗ Sylvester joins the butterflies
    else:
        ctx.report.refuse("Hadamard", "s is neither the orthonormal Sylvester matrix nor an identity: dense factors instead")
        return None
    bb = ctx.bb
    x, signs = _channel_scale(bb, x, n)
    x2, rows, shape = _flatten_rows(bb, x)
    args = [x2] + ([relax.const(signs)] if signs is not None else [])
    if m > 1:
        args.append(relax.const(np.ascontiguousarray(a_np.T).astype(np.float32)))
    key = ("hadamard", n, m, t, u, "signs" if signs is not None else "plain")
    gv = ctx.kernel(key, lambda: K.hadamard_transform(None, n, sylvester=t, dense=m, inner=u, signs=signs is not None))
    y = bb.emit(ctx.call(gv, args, relax.TensorType([rows, n], "float32")))
    return y if len(shape) == 2 else bb.emit(relax.op.reshape(y, shape))


def _channel_scale(bb: relax.BlockBuilder, x, n: int) -> tuple[relax.Expr, np.ndarray | None]:
    """(x0, c) when x = x0 * c for a constant float32 vector c [n] (the rotate pass's sign flips)
    and x0 has x's shape, else (x, None)."""
    expr = bb.lookup_binding(x) if isinstance(x, relax.Var) else x
    if not isinstance(expr, relax.Call) or getattr(expr.op, "name", None) != "relax.multiply":
        return x, None
    x0, c = expr.args
    if not isinstance(c, tvm.ir.GenericConst):
        x0, c = c, x0
    if not isinstance(c, tvm.ir.GenericConst) or str(c.ty.dtype) != "float32":
        return x, None
    vec = c.value.numpy()
    x0_ty = getattr(x0, "ty", None)
    if vec.size != n or vec.shape[-1:] != (n,) or not isinstance(x0_ty, relax.TensorType) or x0_ty.shape is None:
        return x, None
    a, b = _shape(x0), _shape(x)
    if len(a) != len(b) or not all(Analyzer().can_prove_equal(u, v) for u, v in zip(a, b)):
        return x, None
    return x0, np.ascontiguousarray(vec.reshape(n))
