"""Lower a QDQ ONNX model (lpcompile's quantize conventions, opset 21) to a Relax module whose
quantized linear layers call lpcompile's low-bit kernels.

TVM's ONNX importer (`tvm.relax.frontend.onnx`) is extended, not edited: `QdqImporter`
subclasses its graph importer, reads int4/uint4 initializers it cannot, and puts our converter
classes (subclasses of its `OnnxOpConverter`s) in front of its converter table. The patterns
are matched while importing, in dataflow order:

    DequantizeLinear(constant w_q, constant scale)    -> remembered as a quantized weight
    QuantizeLinear(x, scalar scale, scalar zp)        -> quantize kernel, remembered as a
    DequantizeLinear(that q)                             quantized activation
    ai.lpcompile::PerTokenQDQ_int8(x)                 -> per-token quantize kernel, remembered
    MatMul(a, weight) / Gemm(a, weight[, bias])       -> one call_tir to `quantized_matmul` with
                                                         the weight repacked at compile time;
                                                         a quantized `a` whose (activation,
                                                         weight) pair has a kernel is consumed
                                                         in its integer/fp8 form

Every remembered value also has an exact float fallback (the dequantized value), so a DQ or a
quantized activation whose consumer is anything else still computes what ONNX says; fallbacks
nobody uses are removed by dead-code elimination. `LoweringReport` counts what fired and why
a match was refused.
"""

from __future__ import annotations

import contextvars
import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import tvm
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as ox
from tvm.sym.analyzer import Analyzer  # tvm.arith in older TVM

from lpcompile.backends.tvm import kernels as K
from lpcompile.backends.tvm.kernels.compute import FLOAT8
from lpcompile.backends.tvm.target import describe
from lpcompile.errors import ModelError
from lpcompile.formats import INT4, UINT4

log = logging.getLogger(__name__)

OPAQUE = 8  # relax OpPatternKind.kOpaque: never fuse other ops into a scheduled kernel
EXTERNAL_KERNEL = "lpcompile.external_kernel"  # a PrimFunc compiled apart from the relax module
_ML_DTYPES = {int(f.onnx_type): (f.dtype_name, f.numpy_dtype) for f in (INT4, UINT4)}  # ONNX type -> (name, numpy)


@dataclass
class ConstantDequantize:
    """A `DequantizeLinear` of constants (a quantized weight as the ONNX model stores it): its
    inputs in numpy, the codes in their integer / fp8 form, and its attributes."""

    q: np.ndarray  # values as stored (int4/uint4 widened to int8/uint8), ONNX layout
    dtype: str  # "int4", "int8", "float8_e4m3fn", "float8_e5m2", ...
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int
    block_size: int | None


@dataclass
class QuantizedActivation:
    """An activation carried in its quantized form: q [m, k] plus how to scale it."""

    q: relax.Expr  # 2-D [m, k]
    dtype: str
    scale: relax.Expr  # [1] (tensor) or [m] (per token)
    zero_point: relax.Expr | None  # [1] for int8 tensor scales
    kind: str  # "tensor" or "row"
    shape: list  # the activation's original shape


@dataclass
class LoweringReport:
    fired: Counter = field(default_factory=Counter)
    refused: Counter = field(default_factory=Counter)
    # per quantized-weight MatMul/Gemm node (ONNX node name): kernel, status, activation, reason
    layers: dict[str, dict] = field(default_factory=dict)

    def refuse(self, pattern: str, reason: str, node: str | None = None) -> None:
        log.debug("lower: %s not lowered: %s", pattern, reason)
        self.refused[f"{pattern}: {reason}"] += 1
        if node is not None:
            self.layers[node] = {"kernel": None, "status": "float fallback", "activation": "float32",
                                 "reason": f"{pattern}: {reason}; runs in float on the dequantized weights"}


class _Context:
    def __init__(self, target: tvm.target.Target, bb: relax.BlockBuilder):
        self.target = target
        self.bb = bb
        self.weights: dict[relax.Expr, ConstantDequantize] = {}
        self.acts: dict[relax.Expr, QuantizedActivation] = {}
        self.pending_q: dict[relax.Expr, tuple] = {}  # QuantizeLinear output -> (q [m, k], dtype, shape)
        self.low_bit_consts: dict[relax.Expr, tuple[str, np.ndarray]] = {}
        self.low_bit_inputs: dict[relax.Expr, str] = {}  # 4-bit graph inputs, held one code per byte
        self.kernels: dict[tuple, relax.Expr] = {}
        # CPU kernels are compiled as a TIR module of their own and called by name (see
        # pipeline.build): inside a relax-built module TVM 0.27 turns their local buffers and
        # bindings into heap workspaces, and the register-blocked loops spill (3x slower)
        self.separate = target.kind.name == "llvm"
        self.external: dict[str, tirx.PrimFunc] = {}
        self.report = LoweringReport()

    def kernel(self, key: tuple, make) -> relax.Expr:
        """A scheduled kernel (built once per key): a GlobalVar in the module, or for CPU targets
        the name of a separately compiled function."""
        if key not in self.kernels:
            name = "lp_" + "_".join(str(p) for p in key)
            func = K.schedule(make(), self.target)
            func = func.with_attrs({"tirx.is_scheduled": True, "op_pattern": OPAQUE, "global_symbol": name})
            if self.separate:
                self.external[name] = func.with_attr(EXTERNAL_KERNEL, True)
                self.kernels[key] = relax.ExternFunc(name)
            else:
                self.kernels[key] = self.bb.add_func(func, name)
        return self.kernels[key]

    def call(self, kernel: relax.Expr, args: list, out):
        """Call a kernel of `kernel()` in destination-passing style."""
        if isinstance(kernel, relax.ExternFunc):
            return relax.call_dps_packed(kernel, args, out)
        return relax.call_tir(kernel, args, out)


_ACTIVE: contextvars.ContextVar[_Context] = contextvars.ContextVar("lpcompile_lowering")


# --- helpers ------------------------------------------------------------------------------------


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


# --- converters (subclasses of TVM's, looked up before TVM's own table) -------------------------


class DequantizeLinear(ox.DequantizeLinear):
    """Weights: remember the quantized constant (fallback: the dequantized constant).
    Activations after our QuantizeLinear: remember the quantized form (fallback: DQ in Relax)."""

    @classmethod
    def _impl_v21(cls, bb, inputs, attr, params):
        return cls._lower(bb, inputs, attr, params, super()._impl_v21)

    @classmethod
    def _impl_v23(cls, bb, inputs, attr, params):
        return cls._lower(bb, inputs, attr, params, super()._impl_v23)

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
            return var
        return _generic_qdq(ctx, "dequantize", inputs, attr, _code_dtype(ctx, x))


class QuantizeLinear(ox.QuantizeLinear):
    """A scalar-scale QuantizeLinear of a float activation -> our quantize kernel."""

    @classmethod
    def _impl_v21(cls, bb, inputs, attr, params):
        return cls._lower(bb, inputs, attr, params, super()._impl_v21)

    @classmethod
    def _impl_v23(cls, bb, inputs, attr, params):
        return cls._lower(bb, inputs, attr, params, super()._impl_v23)

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


class MatMul(ox.MatMul):
    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        out = _lower_linear(_ACTIVE.get(), inputs[0], inputs[1], transposed=False, pattern="MatMul", node=_node_name(attr))
        return out if out is not None else super()._impl_v13(bb, inputs, attr, params)


class Gemm(ox.Gemm):
    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        ctx = _ACTIVE.get()
        if attr.get("transA", 0) or attr.get("alpha", 1.0) != 1.0 or attr.get("beta", 1.0) != 1.0:
            ctx.report.refuse("Gemm", "transA / alpha / beta", _node_name(attr) if inputs[1] in ctx.weights else None)
            return super()._impl_v13(bb, inputs, attr, params)
        out = _lower_linear(ctx, inputs[0], inputs[1], transposed=bool(attr.get("transB", 0)), pattern="Gemm",
                            node=_node_name(attr))
        if out is None:
            return super()._impl_v13(bb, inputs, attr, params)
        return relax.op.add(out, inputs[2]) if inputs[2] is not None else out


def _node_name(attr: dict) -> str | None:
    return (attr.get("tvm_custom") or {}).get("name")


def kernel_choice(target: tvm.target.Target, act: tuple[str, str] | None, weight: str, k: int, n: int,
                  block: int, rows: int | None = None) -> tuple[bool, K.rules.Choice]:
    """(native, choice) for a [k, n] linear with `weight` codes (a key of `K.PAIRS`) in scale
    blocks of `block` along K (k for one block) whose input is quantized as `act` = (dtype, scale
    kind "tensor" | "row"), or float (None), over `rows` rows (1, or None: several / symbolic).
    Native: a kernel takes the input in its quantized form (else the kernel gets float
    activations); choice: the first kernel rule of the target's list that applies (`K.rules`),
    whose `dot4` says whether the weights go in the dot-product layout (VNNI on CPUs, tensor
    cores on CUDA). The latency model asks the same question, so what it times is what this
    lowering emits."""
    pair = K.PAIRS.get((act[0], weight)) if act is not None else None
    native = pair is not None and pair.act_scale == act[1]
    spec = K.MatmulSpec(act[0] if native else "float32", weight, k, n, block, rows=rows)
    return native, K.choose(describe(target), spec)


def _lower_linear(ctx: _Context, a: relax.Expr, b: relax.Expr, *, transposed: bool, pattern: str, node: str | None = None):
    bb = ctx.bb
    w = ctx.weights.get(b)
    if w is None:
        return None
    report = ctx.report  # refusals of this layer are recorded under its node name
    if w.q.ndim != 2 or a.ty.ndim < 2:
        report.refuse(pattern, "weights must be 2-D and the activation at least 2-D", node)
        return None
    if w.zero_point is not None and np.any(w.zero_point.astype(np.float32) != 0):
        report.refuse(pattern, "asymmetric weights (nonzero zero point)", node)
        return None
    kind = {"int4": "int4", "int8": "int8", **{f: f for f in FLOAT8}}.get(w.dtype)
    if kind is None:
        report.refuse(pattern, f"no kernel for {w.dtype} weights", node)
        return None
    try:
        q_kn, s, block = K.onnx_weight_to_kn(w.q, w.scale, axis=w.axis, block_size=w.block_size, transposed=transposed)
    except ModelError as e:
        report.refuse(pattern, str(e), node)
        return None
    k, n = q_kn.shape
    k_pad = s.shape[0] * block
    act = ctx.acts.get(a)
    native, choice = kernel_choice(ctx.target, (act.dtype, act.kind) if act is not None else None, kind, k, n, block)
    dot4 = choice.dot4
    if kind == "int4" and dot4:
        packed = K.NIB8.pack(q_kn.astype(np.int8), k_pad)
    elif kind == "int4":
        packed = K.NIBBLE.pack(q_kn.astype(np.int8), k_pad)
    elif dot4:
        packed = K.DOT4.pack(q_kn, k_pad)
    else:
        packed = np.zeros((k_pad, n), q_kn.dtype)
        packed[:k] = q_kn
    block_arg = None if block == k else block
    wc, sc = relax.const(packed), relax.const(s.astype(np.float32))

    emulated = None
    if native:
        x2, m = act.q, _shape(act.q)[0]
        args = [x2, act.scale] + ([act.zero_point] if act.zero_point is not None else []) + [wc, sc]
        if act.zero_point is not None:  # the weights' block sums, for the zero point's share
            sums = np.zeros((s.shape[0] * block, n), np.int64)
            sums[:k] = q_kn.astype(np.int64)
            args.append(relax.const(sums.reshape(s.shape[0], block, n).sum(axis=1).astype(np.int32)))
        activation, shape = act.dtype, act.shape
    else:
        if act is not None:
            emulated = f"no {act.kind}-scaled {act.dtype} x {kind} kernel: float activations instead"
            report.refuse(pattern, emulated)
        x2, m, shape = _flatten_rows(bb, a)
        args, activation = [x2, wc, sc], "float32"
    if _static(shape[-1]) != k:
        report.refuse(pattern, f"activation features {shape[-1]} != weight K {k}", node)
        return None
    rows = 1 if _static(m) == 1 else None
    key = ("matmul", activation, kind, rows or "m", k, n, block_arg or "ch") + (("dot4",) if dot4 else ())
    gv = ctx.kernel(key, lambda: K.quantized_matmul(rows, k, n, weight=kind, activation=activation, block_size=block_arg, dot4=dot4))
    y2 = bb.emit(ctx.call(gv, args, relax.TensorType([m, n], "float32")))
    ctx.report.fired[f"{pattern}[{activation} x {kind}]"] += 1
    if node is not None:
        layout = " (tensor cores)" if ctx.target.kind.name == "cuda" else " (dot4)"
        # the rule that schedules the kernel (its layout and row count now fixed), and why the
        # rules before it did not apply
        built = K.choose(describe(ctx.target), K.MatmulSpec(activation, kind, k, n, block, rows=rows, dot4=dot4))
        report.layers[node] = {"kernel": f"{activation} x {kind}" + (layout if dot4 else ""), "activation": activation,
                               "status": "emulated" if emulated else "native", "reason": emulated,
                               "rule": built.rule.name, "rules_refused": built.refused}
    return y2 if len(shape) == 2 else relax.op.reshape(y2, [*shape[:-1], n])


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


CONVERTERS: dict[str, type] = {
    "Gather": Gather,
    "Reshape": Reshape,
    "DequantizeLinear": DequantizeLinear,
    "QuantizeLinear": QuantizeLinear,
    "PerTokenQDQ_int8": PerTokenQDQ_int8,
    "PerTokenQDQ_int4": PerTokenQDQ_int4,
    "Expand": Expand,
    "Hadamard": Hadamard,
    "MatMul": MatMul,
    "Gemm": Gemm,
}


class _ShapedNodes(dict):
    """The importer's value table. A tensor some converter left without a shape, or with symbolic
    dims unrelated to the graph inputs' (TVM gives a Range its own length variable), gets the
    shape ONNX shape inference recorded for it (value_info) in the inputs' symbolic dims,
    through a match_cast (checked at run time); later ops (broadcasts with other tensors,
    reshapes with -1) then legalize."""

    def __init__(self, base: dict, bb: relax.BlockBuilder, value_info: dict, dims: dict):
        super().__init__(base)
        self.bb, self.value_info, self.dims = bb, value_info, dims

    def __setitem__(self, key, value):
        ty = getattr(value, "ty", None)
        vi = self.value_info.get(key)
        if vi is not None and isinstance(ty, relax.TensorType) and self._unknown(ty):
            dims = vi.type.tensor_type.shape.dim
            if ty.ndim in (-1, len(dims)) and all(d.HasField("dim_value") or d.dim_param in self.dims for d in dims):
                shape = [int(d.dim_value) if d.HasField("dim_value") else self.dims[d.dim_param] for d in dims]
                if not isinstance(value, relax.Var):
                    value = self.bb.emit(value)
                value = self.bb.match_cast(value, relax.TensorType(shape, ty.dtype))
        super().__setitem__(key, value)

    def _unknown(self, ty: relax.TensorType) -> bool:
        """No shape, or dims that are symbolic but none of the graph inputs' (e.g. a Range's
        length): broadcasting cannot tell them equal to the inputs' dims."""
        if ty.shape is None:
            return True
        values = getattr(ty.shape, "values", None)
        if values is None:
            return False
        known = {id(v) for v in self.dims.values()}
        return any(isinstance(v, tirx.Var) and not any(v.same_as(k) for k in self.dims.values()) for v in values) and bool(known)


class QdqImporter(ox.ONNXGraphImporter):
    """TVM's ONNX graph importer with lpcompile's converters in front of its own."""

    def _construct_nodes(self, graph):
        dims = {}
        for inp in graph.input:  # the symbolic dims TVM made for the inputs, by name
            var = self._nodes.get(inp.name)
            shape = getattr(getattr(var, "ty", None), "shape", None)
            if shape is None or not hasattr(shape, "values"):
                continue
            for d, v in zip(inp.type.tensor_type.shape.dim, shape.values):
                if d.dim_param and isinstance(v, tirx.Var):
                    dims.setdefault(d.dim_param, v)
        value_info = {v.name: v for v in graph.value_info if v.type.tensor_type.HasField("shape")}
        self._nodes = _ShapedNodes(self._nodes, self.bb, value_info, dims)
        super()._construct_nodes(graph)

    def _parse_graph_input(self, graph):
        """4-bit graph inputs are held one code per byte (int8 / uint8); their type is kept."""
        four = {i.name: i.type.tensor_type.elem_type for i in graph.input
                if i.type.tensor_type.elem_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)}
        if four:
            self._dtype = {name: "int8" if t == onnx.TensorProto.INT4 else "uint8" for name, t in four.items()}
        super()._parse_graph_input(graph)
        ctx = _ACTIVE.get()
        for name, t in four.items():
            ctx.low_bit_inputs[self._nodes[name]] = "int4" if t == onnx.TensorProto.INT4 else "uint4"

    def _parse_graph_initializers(self, graph):
        low_bit = [t for t in graph.initializer if t.data_type in _ML_DTYPES]
        rest = [t for t in graph.initializer if t.data_type not in _ML_DTYPES]
        ctx = _ACTIVE.get()
        for t in low_bit:  # TVM cannot hold int4 tensors: keep them widened to int8, remember the type
            dtype, npt = _ML_DTYPES[t.data_type]
            arr = onnx.numpy_helper.to_array(t).astype(npt).reshape(tuple(t.dims))
            wide = arr.astype(np.int8 if dtype == "int4" else np.uint8)
            c = relax.const(wide)
            self._nodes[t.name] = c
            ctx.low_bit_consts[c] = (dtype, wide)
        filtered = onnx.GraphProto()
        filtered.initializer.extend(rest)
        super()._parse_graph_initializers(filtered)

    def _check_for_unsupported_ops(self, graph):
        unknown = {n.op_type for n in graph.node if n.op_type not in CONVERTERS} - {"Constant", "If"}
        unknown -= set(ox._get_convert_map())
        if unknown:
            raise ModelError(f"operators without a TVM converter: {', '.join(sorted(unknown))}")

    def _convert_operator(self, op_name, inputs, attrs, opset):
        converter = CONVERTERS.get(op_name)
        if converter is None:
            return super()._convert_operator(op_name, inputs, attrs, opset)
        version = 1 if converter in (PerTokenQDQ_int8, PerTokenQDQ_int4, Hadamard) else opset
        sym = converter.get_converter(version)(self.bb, inputs, attrs, [self._nodes, self._params])
        return self.bb.normalize(sym) if isinstance(sym, relax.Expr) else sym


def from_onnx(
    model: onnx.ModelProto, target: tvm.target.Target, shape_dict: dict[str, list] | None = None
) -> tuple[tvm.IRModule, LoweringReport]:
    """Import a QDQ ONNX model into Relax with quantized linear layers on lpcompile's kernels."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    importer = QdqImporter(shape_dict or {}, "float32")
    ctx = _Context(target, importer.bb)
    token = _ACTIVE.set(ctx)
    try:
        mod = importer.from_onnx(model.graph, opset)
    finally:
        _ACTIVE.reset(token)
    mod = relax.transform.DeadCodeElimination()(mod)
    for name, func in ctx.external.items():  # (after DCE: relax refers to them by name only)
        mod[tvm.ir.GlobalVar(name)] = func
    return mod, ctx.report


def compile_model(model: onnx.ModelProto, target: tvm.target.Target, shape_dict: dict[str, list] | None = None):
    """from_onnx + build (lpcompile's pipeline): returns (executable, report)."""
    from lpcompile.backends.tvm.pipeline import build

    mod, report = from_onnx(model, target, shape_dict)
    return build(mod, target), report
