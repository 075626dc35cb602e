"""Linear layers: `MatMul(a, weight)` / `Gemm(a, weight[, bias])` whose weight a
`DequantizeLinear` of constants (`qdq`) remembered become one call to `quantized_matmul` with the
weight repacked at compile time; an input carried quantized whose (activation, weight) pair has
a kernel is consumed in its integer / fp8 form. Which kernel and weight layout: `kernel_choice`,
the target's ordered rule list (`kernels.rules`), the question the latency model asks too.
A refused match runs in float on the dequantized weights, with the reason in the report."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as ox

from lpcompile.backends.tvm import kernels as K
from lpcompile.backends.tvm.kernels.compute import FLOAT8
from lpcompile.backends.tvm.lower.context import _ACTIVE, ConstantDequantize, _Context
from lpcompile.backends.tvm.lower.exprs import _flatten_rows, _node_name, _shape, _static
from lpcompile.backends.tvm.target import describe
from lpcompile.errors import ModelError


class MatMul(ox.MatMul):
    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        ctx = _ACTIVE.get()
        out = _lower_linear(ctx, inputs[0], inputs[1], transposed=False, pattern="MatMul", node=_node_name(attr))
        if out is None:
            out = activation_matmul(ctx, inputs[0], inputs[1], _node_name(attr))
        return out if out is not None else super()._impl_v13(bb, inputs, attr, params)


def activation_matmul(ctx: _Context, a: relax.Expr, b: relax.Expr, node: str | None):
    """`dequantize(a) @ dequantize(b)` of two activations quantized to int8 with scalar scales and
    zero point 0 (`passes.attention`): the int8 codes multiplied with int32 accumulation (TVM's
    matmul on int8 operands, the cast inside its inner loop), scaled once by sa x sb. None where
    the inputs are not such values; float8 codes (no FP8 arithmetic on CPUs) and non-zero zero
    points run in float on the dequantized inputs, recorded as emulated."""
    ca, cb = ctx.act_codes.get(a), ctx.act_codes.get(b)
    if ca is None or cb is None:
        return None
    (qa, ta, sa, za), (qb, tb, sb, zb) = ca, cb
    if ta == tb == "int8" and za == zb == 0.0:
        bb = ctx.bb
        acc = bb.emit(relax.op.matmul(qa, qb, out_dtype="int32"))
        y = bb.emit(relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(np.float32(sa * sb))))
        ctx.report.fired["MatMul[int8 x int8 activations]"] += 1
        if node is not None:
            ctx.report.layers[node] = {"kernel": "int8 x int8 -> int32 matmul (TVM)", "status": "native",
                                       "activation": "int8", "reason": None}
        return y
    if node is not None:
        ctx.report.layers[node] = {
            "kernel": None, "status": "emulated", "activation": f"{ta} x {tb}",
            "reason": f"{ta} x {tb} activations (zero points {za:g}, {zb:g}): no integer product for them; the "
                      "codes are dequantized and multiplied in float"}
    return None


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
    w = ctx.weights.get(b)
    if w is None:
        return None
    return lower_weight(ctx, a, w, transposed=transposed, pattern=pattern, node=node)


def lower_weight(ctx: _Context, a: relax.Expr, w: ConstantDequantize, *, transposed: bool, pattern: str,
                 node: str | None = None):
    """`a @ dequantize(w)` on the quantized_matmul kernels (None, with the refusal recorded,
    where no kernel takes it); `a` may be carried quantized (`ctx.acts`). Also the GEMM of a
    lowered convolution (`conv`), which hands in its im2col patches and a 2-D weight."""
    bb = ctx.bb
    report = ctx.report  # refusals of this layer are recorded under its node name
    if w.q.ndim != 2 or a.ty.ndim < 2:
        report.refuse(pattern, "weights must be 2-D and the activation at least 2-D", node)
        return None
    codes, held = w.q, None
    if w.zero_point is not None and np.any(w.zero_point.astype(np.float32) != 0):
        codes = _centred_codes(w)
        if codes is None:
            report.refuse(pattern, f"asymmetric {w.dtype} weights whose codes minus zero point do not fit int8", node)
            return None
        held = f"asymmetric {w.dtype} weights held as int8 codes minus zero point (exact; 8 bits per weight)"
        kind = "int8"
    else:
        kind = {"int4": "int4", "int8": "int8", **{f: f for f in FLOAT8}}.get(w.dtype)
    if kind is None:
        report.refuse(pattern, f"no kernel for {w.dtype} weights", node)
        return None
    try:
        q_kn, s, block = K.onnx_weight_to_kn(codes, w.scale, axis=w.axis, block_size=w.block_size, transposed=transposed)
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
                               "status": "emulated" if emulated else "native", "reason": emulated or held,
                               "rule": built.rule.name, "rules_refused": built.refused}
    return y2 if len(shape) == 2 else relax.op.reshape(y2, [*shape[:-1], n])


def _centred_codes(w: ConstantDequantize) -> np.ndarray | None:
    """An asymmetric integer weight's codes minus its zero point, as int8 (None where they do
    not fit): DequantizeLinear computes (q - z) * scale, so the int8 kernel on (q - z) with the
    same scales is exact. 4-bit codes always fit ([-15, 15]); this is how a table quantized as
    an embedding (uint4, asymmetric) and tied to the output projection runs natively."""
    if w.dtype not in ("int4", "uint4", "int8", "uint8"):
        return None
    z = np.asarray(w.zero_point).astype(np.int16)
    q = np.asarray(w.q).astype(np.int16)
    if z.ndim == 0 or z.size == 1:
        z = z.reshape(())
    elif w.block_size:  # blocked: z has q's shape with the axis divided into blocks
        z = np.repeat(z, w.block_size, axis=w.axis % q.ndim)
        z = np.take(z, np.arange(q.shape[w.axis % q.ndim]), axis=w.axis % q.ndim)
    else:  # per channel along axis
        shape = [1] * q.ndim
        shape[w.axis % q.ndim] = q.shape[w.axis % q.ndim]
        z = z.reshape(shape)
    d = q - z
    if d.min() < -128 or d.max() > 127:
        return None
    return d.astype(np.int8)
