"""Shape values while importing: what an exporter's shape arithmetic (`Shape`, `Gather`, `Squeeze`,
`Concat`, `Add`, ...) becomes in TVM 0.27's ONNX importer, and the conversions between its forms.

TVM keeps a value computed from shapes symbolic as long as it can: a 1-D int64 tensor read from
`Shape` is a `relax.ShapeExpr` of dims, a scalar (`Squeeze(Shape(x))`, `Gather(Shape(x), 1)`)
is a primitive expression (`PrimType`; in 0.27 TIR expressions are relax values), and arithmetic
on them folds into new symbolic expressions. A converter that does not expect these forms fails
(`Reshape expects the input data to be a Tensor. However, the given input is ir.PrimType`). The
helpers here give every converter what it expects:

    shape_values(x)     the dims of a shape-like value (ShapeExpr, scalar, 1-D/0-d int constant)
    as_tensor(bb, x)    the same value as an int64 tensor, for ops that compute on tensors
    as_shape(bb, x)     a ShapeExpr for ops that take a shape (Reshape, Expand, ...), also from a
                        tensor computed at run time (`tensor_to_shape`, its length static)

so shape arithmetic stays symbolic when all its inputs are shapes or constants, and a shape that
only exists at run time still reaches the op as a shape. A shape value some consumer cannot take
(`Mul(Slice(Shape(x), 0, 2), c)`: TVM refuses ShapeExpr inputs outside `SHAPE_OPS`) is read
there from a tensor alias (importer._ShapedNodes), its other readers keep the ShapeExpr; a shape
the graph returns is held as a tensor that remembers its dims, so a Reshape reading it stays
symbolic."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx

from lpcompile.backends.tvm.lower.context import _ACTIVE
from lpcompile.errors import ModelError

# The ops whose TVM 0.27 converters take a ShapeExpr input (onnx_frontend's
# `shape_compatible_ops`, which it checks before converting): any other consumer of a shape value
# reads it as a tensor (`as_tensor`, through importer._ShapedNodes' alias).
SHAPE_OPS = frozenset({"Reshape", "Resize", "ConstantOfShape", "Gather", "Slice", "Shape", "Expand", "Concat",
                       "Equal", "Where", "Cast", "CastLike", "Squeeze"})

SHAPE_DTYPE = "int64"


def is_scalar(x) -> bool:
    """A primitive (TIR) expression or relax value of PrimType: a symbolic scalar."""
    return x is not None and tvm.ir.is_prim_expr(x)


def is_shape(x) -> bool:
    return isinstance(x, relax.ShapeExpr)


def shape_values(x) -> list | None:
    """The dims of a shape-like value: a ShapeExpr, a scalar, or an integer constant of rank 0
    or 1; None for anything else (a tensor computed at run time)."""
    if is_shape(x):
        return list(x.values)
    if is_scalar(x):
        return [x]
    if isinstance(x, tvm.ir.GenericConst):
        arr = x.value.numpy()
        if arr.ndim <= 1 and np.issubdtype(arr.dtype, np.integer):
            return [int(v) for v in arr.reshape(-1)]
    return None


def int64_expr(v):
    if isinstance(v, (int, np.integer)):
        return tirx.IntImm(SHAPE_DTYPE, int(v))
    if str(v.ty) != SHAPE_DTYPE:
        return tirx.Cast(SHAPE_DTYPE, v)
    return v


def as_tensor(bb: relax.BlockBuilder, x):
    """An int64 tensor holding a shape-like value: [n] for a ShapeExpr, a 0-d tensor for a scalar;
    tensors pass through. The tensor of a ShapeExpr remembers its dims for `as_shape`."""
    if is_shape(x):
        t = bb.emit(relax.op.shape_to_tensor(x))
        ctx = _ACTIVE.get(None)
        if ctx is not None:
            ctx.shape_tensors[t] = x
        return t
    if is_scalar(x):
        t = bb.normalize(relax.op.shape_to_tensor(relax.ShapeExpr([int64_expr(x)])))
        return bb.normalize(relax.op.reshape(t, ()))
    return x


def as_shape(bb: relax.BlockBuilder, x, prefix: str = "dim") -> relax.ShapeExpr:
    """A ShapeExpr for a shape operand: symbolic dims as they are, a 1-D tensor computed at run
    time through `tensor_to_shape` (its length must be static) with fresh dims bound by a
    match_cast."""
    values = shape_values(x)
    if values is not None:
        return relax.ShapeExpr([int64_expr(v) for v in values])
    ctx = _ACTIVE.get(None)
    if ctx is not None and x in ctx.shape_tensors:
        return ctx.shape_tensors[x]
    ty = getattr(x, "ty", None)
    if not isinstance(ty, relax.TensorType) or ty.ndim != 1 or ty.shape is None:
        raise ModelError(f"a shape operand must be a 1-D integer tensor of static length, got {ty}")
    (n,) = ty.shape.values
    if not isinstance(n, tirx.IntImm):
        raise ModelError(f"a shape operand computed at run time has a length unknown at compile time ({n})")
    if str(ty.dtype) != SHAPE_DTYPE:
        x = bb.normalize(relax.op.astype(x, SHAPE_DTYPE))
    x = bb.match_cast(x, relax.TensorType([int(n)], SHAPE_DTYPE))
    shape = bb.emit(relax.op.tensor_to_shape(x))
    dims = [tirx.Var(f"{prefix}_{i}", SHAPE_DTYPE) for i in range(int(n))]
    bb.match_cast(shape, relax.ShapeType(dims))
    return relax.ShapeExpr(dims)


def resolve_reshape(dims: list, target: list, allowzero: bool) -> list:
    """ONNX Reshape's target with 0 (copy the input's dim) resolved; -1 is left to relax."""
    if allowzero:
        return list(target)
    out = []
    for i, t in enumerate(target):
        if isinstance(t, (int, tirx.IntImm)) and int(t) == 0:
            if i >= len(dims):
                raise ModelError(f"Reshape: 0 at axis {i} of a rank-{len(dims)} input")
            out.append(dims[i])
        else:
            out.append(t)
    return out
