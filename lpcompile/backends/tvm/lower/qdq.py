"""Q/DQ converters: `DequantizeLinear`, `QuantizeLinear` and lpcompile's dynamic per-token
`ai.lpcompile::PerTokenQDQ_int8 / _int4`.

    DequantizeLinear(constant w_q, constant scale)    -> remembered as a quantized weight
                                                         (`ConstantDequantize`), for `linear`
                                                         and `gather` to consume
    QuantizeLinear(x, scalar scale, scalar zp)        -> quantize kernel, remembered as a
    DequantizeLinear(that q)                             quantized activation
    ai.lpcompile::PerTokenQDQ_int8(x)                 -> per-token quantize kernel, remembered
    anything else (any rank; per-axis / blocked)      -> one elementwise Q or DQ kernel

Every remembered value also has an exact float fallback (the dequantized constant, or the
activation dequantized in Relax: `_dequantize_activation`), so a consumer other than our
linear / gather converters still computes what ONNX says. Float8 codes are decoded by a small
kernel (`_decode_kernel`), also used by `gather`."""

from __future__ import annotations

import numpy as np
import onnx
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as ox

from lpcompile.backends.tvm import kernels as K
from lpcompile.backends.tvm.kernels.compute import FLOAT8
from lpcompile.backends.tvm.lower.context import _ACTIVE, ConstantDequantize, QuantizedActivation, _Context
from lpcompile.backends.tvm.lower.exprs import _const_array, _flatten_rows, _shape, _static
from lpcompile.errors import ModelError


def _dequantize_numpy(w: ConstantDequantize) -> np.ndarray:
    """ONNX DequantizeLinear on constants, exactly (fp8 decoded by ml_dtypes)."""
    q = w.q.astype(np.float32)
    scale, zp = w.scale.astype(np.float32), w.zero_point
    axis = w.axis % w.q.ndim
    if scale.size == 1:
        s = scale.reshape(())
        z = np.float32(0) if zp is None else zp.astype(np.float32).reshape(())
    elif w.block_size:
        s = np.repeat(scale, w.block_size, axis=axis).take(range(w.q.shape[axis]), axis=axis)
        z = 0 if zp is None else np.repeat(zp.astype(np.float32), w.block_size, axis=axis).take(range(w.q.shape[axis]), axis=axis)
    else:
        bshape = [1] * w.q.ndim
        bshape[axis] = -1
        s = scale.reshape(bshape)
        z = 0 if zp is None else zp.astype(np.float32).reshape(bshape)
    return ((q - z) * s).astype(np.float32)


class _LowerEveryOpset:
    """Opsets 21 and 23 of a Q/DQ converter both go through the subclass's `_lower`, which gets
    TVM's stock converter of that opset to fall back on."""

    @classmethod
    def _impl_v21(cls, bb, inputs, attr, params):
        return cls._lower(bb, inputs, attr, params, super()._impl_v21)

    @classmethod
    def _impl_v23(cls, bb, inputs, attr, params):
        return cls._lower(bb, inputs, attr, params, super()._impl_v23)


class DequantizeLinear(_LowerEveryOpset, ox.DequantizeLinear):
    """Weights: remember the quantized constant (fallback: the dequantized constant).
    Activations after our QuantizeLinear: remember the quantized form (fallback: DQ in Relax)."""

    @classmethod
    def _lower(cls, bb, inputs, attr, params, stock):
        ctx = _ACTIVE.get()
        x, scale, zp = inputs[0], inputs[1], inputs[2]
        cx, cs = _const_array(ctx, x), _const_array(ctx, scale)
        cz = _const_array(ctx, zp) if zp is not None else None
        if cx is not None and cs is not None and (zp is None or cz is not None):
            dtype, q = cx
            w = ConstantDequantize(
                q=q, dtype=dtype, scale=cs[1], zero_point=None if cz is None else cz[1],
                axis=int(attr.get("axis", 1)), block_size=int(attr.get("block_size", 0)) or None,
            )
            var = bb.emit(relax.const(_dequantize_numpy(w)))
            ctx.weights[var] = w
            return var
        if x in ctx.pending_q and cs is not None and cs[1].size == 1 and (zp is None or (cz is not None and cz[1].size == 1)):
            q2, dtype, shape = ctx.pending_q[x]  # the activation as this DQ scales it
            s1 = relax.const(cs[1].astype(np.float32).reshape(1))
            z1 = None
            if dtype in ("int8", "uint8"):
                z1 = relax.const((cz[1] if cz is not None else np.zeros(1)).astype(dtype).reshape(1))
            elif cz is not None and float(cz[1].astype(np.float32).reshape(())) != 0:
                raise ModelError("DequantizeLinear: float8 zero points must be 0")
            act = QuantizedActivation(q=q2, dtype=dtype, scale=s1, zero_point=z1, kind="tensor", shape=shape)
            var = bb.emit(_dequantize_activation(ctx, act))
            ctx.acts[var] = act
            _remember_codes(ctx, var, x, dtype, cs, cz)
            return var
        var = _generic_qdq(ctx, "dequantize", inputs, attr, _code_dtype(ctx, x))
        if cs is not None and cs[1].size == 1 and (zp is None or (cz is not None and cz[1].size == 1)):
            _remember_codes(ctx, var, x, _code_dtype(ctx, x), cs, cz)
        return var


def _remember_codes(ctx: _Context, var: relax.Expr, codes: relax.Expr, dtype: str, cs, cz) -> None:
    """`var` = (codes - zero point) x scale with scalars: an activation x activation MatMul of two
    such values multiplies the codes (`linear.activation_matmul`)."""
    zero = 0.0 if cz is None else float(cz[1].astype(np.float32).reshape(()))
    ctx.act_codes[var] = (codes, dtype, float(cs[1].astype(np.float32).reshape(())), zero)


class QuantizeLinear(_LowerEveryOpset, ox.QuantizeLinear):
    """A scalar-scale QuantizeLinear of a float activation -> our quantize kernel."""

    @classmethod
    def _lower(cls, bb, inputs, attr, params, stock):
        ctx = _ACTIVE.get()
        x, scale, zp = inputs[0], inputs[1], inputs[2]
        cs = _const_array(ctx, scale)
        cz = _const_array(ctx, zp) if zp is not None else None
        code = _quantize_code(ctx, zp, attr)
        fusable = cs is not None and cs[1].size == 1 and cz is not None and cz[1].size == 1 and not attr.get("block_size", 0)
        if not fusable or code not in ("int8", "uint8", *FLOAT8) or _static(_shape(x)[-1]) is None:
            return _generic_qdq(ctx, "quantize", inputs, attr, code)  # not a candidate for a fused linear
        dtype = cz[0]
        if dtype in FLOAT8 and float(cz[1].astype(np.float32).reshape(())) != 0:
            raise ModelError("QuantizeLinear: float8 zero points must be 0")
        x2, m, shape = _flatten_rows(bb, x)
        k = _static(shape[-1])
        s1 = relax.const(cs[1].astype(np.float32).reshape(1))
        args = [x2, s1]
        zp1 = None
        if dtype in ("int8", "uint8"):
            zp1 = relax.const(cz[1].astype(dtype).reshape(1))
            args.append(zp1)
        gv = ctx.kernel(("quantize", dtype, k), lambda: K.quantize_tensor(None, k, dtype))
        q2 = bb.emit(ctx.call(gv, args, relax.TensorType([m, k], dtype)))
        q = q2 if len(shape) == 2 else bb.emit(relax.op.reshape(q2, shape))
        ctx.pending_q[q] = (q2, dtype, shape)
        ctx.report.fired["QuantizeLinear"] += 1
        return q


def _code_dtype(ctx: _Context, x: relax.Expr) -> str:
    """The ONNX element type of a quantized tensor (4-bit ones are held one code per byte)."""
    c = _const_array(ctx, x)
    if c is not None:
        return c[0]
    return ctx.low_bit_inputs.get(x, str(x.ty.dtype))


def _quantize_code(ctx: _Context, zp, attr: dict) -> str:
    """QuantizeLinear's output type: output_dtype, else the zero point's type, else uint8."""
    if attr.get("output_dtype", 0):
        return str(onnx.helper.tensor_dtype_to_np_dtype(int(attr["output_dtype"])))
    return _code_dtype(ctx, zp) if zp is not None else "uint8"


def _generic_qdq(ctx: _Context, kind: str, inputs, attr: dict, code: str) -> relax.Expr:
    """QuantizeLinear / DequantizeLinear of any rank with scalar, per-axis or blocked scales and
    zero points given as tensors (constants or run-time inputs): one elementwise kernel."""
    bb = ctx.bb
    x, scale = inputs[0], inputs[1]
    zp = inputs[2] if len(inputs) > 2 else None
    for name, v in (("input", x), ("scale", scale), ("zero point", zp)):
        if v is not None and (not isinstance(getattr(v, "ty", None), relax.TensorType) or v.ty.shape is None):
            raise ModelError(f"{kind}: the {name} needs a known rank and shape")
    shape, sshape = _shape(x), _shape(scale)
    block = int(attr.get("block_size", 0)) or None
    per_tensor = len(sshape) == 0 or (len(sshape) == 1 and _static(sshape[0]) == 1 and not block)
    axis = None if per_tensor else int(attr.get("axis", 1)) % max(len(shape), 1)
    if block and len(sshape) != len(shape):
        raise ModelError(f"{kind}: blocked scales need the input's rank ({len(shape)}), got {len(sshape)}")
    if axis is not None and not block and len(sshape) != 1:
        raise ModelError(f"{kind}: per-axis scales must be 1-D, got rank {len(sshape)}")
    float_dtype = str(scale.ty.dtype)
    args = [x, scale] + ([zp] if zp is not None else [])
    zshape = None if zp is None else _shape(zp)
    key = (kind, code, float_dtype, axis, block, *(tuple(str(d) for d in t) if t is not None else None for t in (shape, sshape, zshape)))
    if kind == "dequantize":
        make = lambda: K.dequantize_linear(shape, code, sshape, zshape, axis=axis, block=block, out_dtype=float_dtype)  # noqa: E731
        out_ty = relax.TensorType(shape, float_dtype)
    else:
        make = lambda: K.quantize_linear(shape, code, sshape, zshape, axis=axis, block=block, in_dtype=float_dtype)  # noqa: E731
        out_ty = relax.TensorType(shape, K.code_storage(code))
    gv = ctx.kernel(key, make)
    out = bb.emit(ctx.call(gv, args, out_ty))
    if kind == "quantize" and code in ("int4", "uint4"):
        ctx.low_bit_inputs[out] = code
    ctx.report.fired[f"{'DequantizeLinear' if kind == 'dequantize' else 'QuantizeLinear'}[{code}, elementwise]"] += 1
    return out


class PerTokenQDQ_int8(ox.OnnxOpConverter):  # noqa: N801 (the ONNX op name)
    """`ai.lpcompile::PerTokenQDQ_int8(x)`: dynamic per-token int8 quantization."""

    codes = "int8"

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        ctx = _ACTIVE.get()
        x2, m, shape = _flatten_rows(bb, inputs[0])
        k = _static(shape[-1])
        gv = ctx.kernel(("quantize_rows", cls.codes, k), lambda: K.quantize_rows(None, k, cls.codes))
        out = bb.emit(ctx.call(gv, [x2], [relax.TensorType([m, k], "int8"), relax.TensorType([m], "float32")]))
        q, s = bb.emit(relax.TupleGetItem(out, 0)), bb.emit(relax.TupleGetItem(out, 1))
        # int4 codes travel in int8: the int8-activation kernels multiply them unchanged
        act = QuantizedActivation(q=q, dtype="int8", scale=s, zero_point=None, kind="row", shape=shape)
        var = bb.emit(_dequantize_activation(ctx, act))
        ctx.acts[var] = act
        ctx.report.fired[f"PerTokenQDQ_{cls.codes}"] += 1
        return var


class PerTokenQDQ_int4(PerTokenQDQ_int8):  # noqa: N801 (the ONNX op name)
    """`ai.lpcompile::PerTokenQDQ_int4(x)`: dynamic per-token int4 quantization (W4A4)."""

    codes = "int4"


def _dequantize_activation(ctx: _Context, act: QuantizedActivation) -> relax.Expr:
    """The float value of a quantized activation (the fallback when no kernel consumes it)."""
    bb = ctx.bb
    if act.dtype in FLOAT8:
        m, k = _shape(act.q)
        gv = ctx.kernel(("decode", act.dtype, _static(k)), lambda: _decode_kernel(_static(k), act.dtype))
        qf = bb.emit(ctx.call(gv, [act.q], relax.TensorType([m, k], "float32")))
    else:
        qf = relax.op.astype(act.q, "float32")
        if act.zero_point is not None:
            qf = relax.op.subtract(qf, relax.op.astype(act.zero_point, "float32"))
    scale = act.scale if act.kind == "tensor" else relax.op.expand_dims(act.scale, [-1])
    y = bb.emit(relax.op.multiply(qf, scale))
    return y if len(act.shape) == 2 else relax.op.reshape(y, act.shape)


def _decode_kernel(k: int, dtype: str) -> tirx.PrimFunc:
    from tvm import te

    from lpcompile.backends.tvm.kernels.compute import KERNEL_ATTR, dim, fp8_to_float32

    x = te.placeholder((dim(None), dim(k)), dtype, name="x")
    y = te.compute(x.shape, lambda i, j: fp8_to_float32(x[i, j], dtype), name="quantize")  # elementwise schedule
    return te.create_prim_func([x, y]).with_attr({KERNEL_ATTR: "quantize_tensor"})
