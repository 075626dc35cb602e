"""Reading Relax values while importing: a constant's numpy array (4-bit ones in their real
type), a tensor's shape, a dim's static value, an activation flattened to [rows, features], and
the ONNX node name TVM passes to a converter. Shared by every converter module."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.sym.analyzer import Analyzer  # tvm.arith in older TVM

from lpcompile.backends.tvm.lower.context import _Context


def _const_array(ctx: _Context, expr) -> tuple[str, np.ndarray] | None:
    """(dtype, numpy) of a constant input, with int4 / uint4 in their real dtype."""
    if expr in ctx.low_bit_consts:
        return ctx.low_bit_consts[expr]
    if isinstance(expr, tvm.ir.GenericConst):  # relax constants (relax.Constant in older TVM)
        return str(expr.ty.dtype), expr.value.numpy()
    return None


def _shape(expr) -> list:
    return list(expr.ty.shape.values)


def _flatten_rows(bb: relax.BlockBuilder, x: relax.Expr) -> tuple[relax.Expr, tirx.PrimExpr, list]:
    """x [..., k] -> (x2d [m, k], m, original shape)."""
    shape = _shape(x)
    m = tirx.IntImm("int64", 1)
    for d in shape[:-1]:
        m = m * d
    m = Analyzer().simplify(m)
    x2 = x if len(shape) == 2 else bb.emit(relax.op.reshape(x, [m, shape[-1]]))
    return x2, m, shape


def _static(v) -> int | None:
    return int(v) if isinstance(v, (int, tirx.IntImm)) else None


def _node_name(attr: dict) -> str | None:
    return (attr.get("tvm_custom") or {}).get("name")
