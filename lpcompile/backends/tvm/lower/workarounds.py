"""Converters that work around TVM 0.27's stock ONNX ones on graphs they mishandle, computing
the same ONNX semantics: `Expand` over symbolic dims, `Reshape` of a tensor of known rank but
unknown shape. Nothing low-precision here; remove one when TVM's own converter handles its case."""

from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as ox

from lpcompile.backends.tvm.lower.exprs import _shape, _static
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
    """TVM's Reshape, but a tensor whose rank is known and shape is not (e.g. behind a broadcast
    with an attention mask built by GatherND) first gets symbolic dims through a match_cast,
    so a `-1` in the new shape can be inferred."""

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        data = inputs[0]
        ty = getattr(data, "ty", None)
        if isinstance(ty, relax.TensorType) and ty.shape is None and ty.ndim > 0:
            dims = [tirx.Var(f"reshape_d{i}", "int64") for i in range(ty.ndim)]
            data = bb.match_cast(data, relax.TensorType(dims, ty.dtype))
            inputs = [data, *inputs[1:]]
        return super()._impl_v13(bb, inputs, attr, params)
