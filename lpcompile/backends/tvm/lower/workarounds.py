"""Converters that work around TVM 0.27's stock ONNX ones on graphs they mishandle, computing
the same ONNX semantics: `Expand` over symbolic dims, `Reshape` of shape values and by shapes in
any form (`shapes`), `Range` over symbolic scalars. Nothing low-precision here; remove one when
TVM's own converter handles its case."""

from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as ox
from tvm.sym.analyzer import Analyzer

from lpcompile.backends.tvm.lower.exprs import _shape, _static
from lpcompile.backends.tvm.lower.shapes import as_shape, as_tensor, is_scalar, resolve_reshape, shape_values, int64_expr
from lpcompile.errors import ModelError


class Expand(ox.Expand):
    """TVM's Expand, but a constant target shape over an input with symbolic dims (a GQA
    key/value repeat: [b, h, 1, s, d] -> [b, h, g, s, d]) broadcasts by the ONNX rules instead
    of asking the symbolic dims for their values."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        data, shape = inputs
        dims = _shape(data) if isinstance(getattr(data, "ty", None), relax.TensorType) and data.ty.shape is not None else None
        if not isinstance(shape, tvm.ir.GenericConst) or dims is None or all(_static(d) is not None for d in dims):
            return super()._impl_v13(bb, inputs, attr, params)
        target = [int(v) for v in shape.value.numpy().tolist()]
        rank = max(len(target), len(dims))
        target = [1] * (rank - len(target)) + target
        dims = [1] * (rank - len(dims)) + list(dims)
        out = []
        for d, t in zip(dims, target):
            if t in (1, -1):  # keep the input's dim (broadcast from 1 happens only in the other direction)
                out.append(d)
            elif _static(d) not in (None, 1, t):
                raise ModelError(f"Expand: cannot broadcast dim {_static(d)} to {t}")
            else:
                out.append(t)
        return relax.op.broadcast_to(data, relax.ShapeExpr(out))


class Reshape(ox.Reshape):
    """TVM's Reshape, extended to the forms shape arithmetic takes (see `shapes`):

    - a shape value reshaped (`Reshape(Add(1, Squeeze(Shape(ids))), [1])`, a scalar made a
      1-element vector, or back) stays a symbolic shape / scalar;
    - the new shape may be symbolic (a ShapeExpr with 0s copying the input's dims), a scalar,
      or a tensor computed at run time (`tensor_to_shape`);
    - a tensor whose rank is known and shape is not (e.g. behind a broadcast with an attention
      mask built by GatherND) first gets symbolic dims through a match_cast, so a `-1` in the
      new shape can be inferred."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        data, shape = inputs[0], inputs[1]
        allowzero = bool(attr.get("allowzero", 0))
        if isinstance(data, tvm.ir.GenericConst) and isinstance(shape, tvm.ir.GenericConst):
            return super()._impl_v13(bb, inputs, attr, params)
        values = shape_values(data) if not isinstance(data, tvm.ir.GenericConst) else None
        target = shape_values(shape) if isinstance(shape, tvm.ir.GenericConst) else None
        if values is not None and target is not None and len(target) <= 1:
            # a shape value (n dims) as a vector [n] / [-1] / [0], or a single dim as a scalar []
            if not target and len(values) == 1:
                return values[0]
            if target and (target[0] in (-1, len(values)) or (target[0] == 0 and not allowzero)) and all(
                    isinstance(v, int) or str(v.ty) == "int64" for v in values):
                return relax.ShapeExpr(list(values))
        data = as_tensor(bb, data)
        ty = getattr(data, "ty", None)
        if isinstance(ty, relax.TensorType) and ty.shape is None and ty.ndim > 0:
            dims = [tirx.Var(f"reshape_d{i}", "int64") for i in range(ty.ndim)]
            data = bb.match_cast(data, relax.TensorType(dims, ty.dtype))
        new = as_shape(bb, shape, "reshape_dim")
        return relax.op.reshape(data, resolve_reshape(_shape(data), list(new.values), allowzero))


class Range(ox.Range):
    """TVM's Range, but an integer range over symbolic scalars (`Range(0, Squeeze(Shape(ids)), 1)`,
    the position ids of a decoder) keeps its length symbolic - ceil((limit - start) / delta),
    at least 0 - instead of reading it back from a tensor into a fresh dim that no later op can
    tell equal to the sequence length."""

    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        values = [shape_values(x) for x in inputs]
        if any(v is None or len(v) != 1 for v in values) or not any(is_scalar(x) for x in inputs):
            return super()._impl_v12(bb, inputs, attr, params)
        start, limit, delta = (v[0] for v in values)
        dtype = str(inputs[0].ty) if is_scalar(inputs[0]) else str(inputs[0].ty.dtype)
        if not dtype.startswith(("int", "uint")) or not isinstance(delta, int) or delta == 0:
            return super()._impl_v12(bb, inputs, attr, params)
        span = Analyzer().simplify(int64_expr(limit) - int64_expr(start))
        if delta == 1 and isinstance(start, int) and start == 0 and isinstance(limit, tirx.Var):
            # a dim read from a shape (or a scalar graph input, the same Var type in TVM 0.27, which
            # must then not be negative): kept equal to the dim, so broadcasts against it check
            length = span
        else:
            length = Analyzer().simplify(tirx.max(tirx.ceildiv(span, delta) if delta > 0 else
                                                  tirx.ceildiv(-span, -delta), 0))
        positions = relax.op.arange(0, length, 1, "int64")
        if delta != 1:
            positions = relax.op.multiply(positions, relax.const(delta, "int64"))
        if not (isinstance(start, int) and start == 0):
            positions = relax.op.add(positions, as_tensor(bb, start) if not isinstance(start, int) else relax.const(start, "int64"))
        return positions if dtype == "int64" else relax.op.astype(positions, dtype)
