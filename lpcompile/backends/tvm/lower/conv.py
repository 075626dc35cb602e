"""Convolutions: `Conv(x, DequantizeLinear(constant w_q, scale))` (1-D and 2-D, grouped and
depthwise) lowered as im2col + the `quantized_matmul` kernels, so the artifact holds the low-bit
codes and a quantized input is consumed in its integer / fp8 form (VNNI dot4 kernels where the
CPU has them, the generic schedule elsewhere, tensor cores on CUDA: the same rule list as linear
layers, `linear.lower_weight`).

    x [N, C, *S]  --permute-->  [N, *S, C]  --pad-->  one strided slice per kernel tap
      --concat--> patches [N, *OS, taps * C]  (K ordered tap-major, channel-minor: the canonical
      conv layout of `lpcompile.ir.patterns`)  --reshape--> [M, K] @ [K, Cout] --> [N, Cout, *OS]

A quantized input is patched in its code form: padding with the zero point's code is padding
with 0.0, so the patches' codes are exactly the codes of the padded float input. Grouped convs
run one GEMM per group (K = taps * C/groups). Depthwise convs (one input channel per group: a
GEMM per channel would be a 1-column matmul) multiply-add the taps: on integer codes when the
input is carried as int8 / uint8 codes (int32 sums of (x - z) * w, scaled once per output:
`native`), else in float on weights dequantized in the graph from their stored codes
(`emulated`). ConvTranspose, 3-D
convs, `auto_pad=SAME_*` and inputs with symbolic spatial dims run TVM's float convolution on the
dequantized weights, with the reason in the lowering report (`float fallback`)."""

from __future__ import annotations

import itertools

import numpy as np
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as ox

from lpcompile.backends.tvm.lower.context import _ACTIVE, ConstantDequantize, QuantizedActivation, _Context
from lpcompile.backends.tvm.lower.exprs import _flatten_rows, _node_name, _shape, _static
from lpcompile.backends.tvm.lower.linear import lower_weight


class Conv(ox.Conv):
    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        out = lower_conv(_ACTIVE.get(), inputs, dict(attr), _node_name(attr))
        return out if out is not None else super()._impl_v11(bb, inputs, attr, params)


class ConvTranspose(ox.ConvTranspose):
    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        ctx = _ACTIVE.get()
        if inputs[1] in ctx.weights:
            ctx.report.refuse("ConvTranspose", "no transposed-convolution kernel (col2im) yet", _node_name(attr))
        return super()._impl_v1(bb, inputs, attr, params)


def _ints(attr: dict, key: str, default: list[int]) -> list[int]:
    v = attr.get(key)
    return [int(x) for x in v] if v is not None else default


def why_not_lowered(x_shape: list, w: ConstantDequantize, attr: dict) -> str | None:
    """Why this quantized Conv cannot run as im2col GEMMs (None: it can)."""
    nd = len(x_shape) - 2
    if nd not in (1, 2):
        return f"{nd}-D convolution (1-D and 2-D are lowered)"
    pad = attr.get("auto_pad", b"NOTSET")
    pad = pad.decode() if isinstance(pad, bytes) else str(pad)
    if pad not in ("NOTSET", "VALID"):
        return f"auto_pad={pad}"
    if any(_static(d) is None for d in x_shape[1:]):
        return "symbolic channel or spatial dims"
    if w.q.ndim != nd + 2:
        return f"weight rank {w.q.ndim} for a {nd}-D input"
    groups = int(attr.get("group", 1))
    cin_g = w.q.shape[1]
    if _static(x_shape[1]) != cin_g * groups or w.q.shape[0] % groups:
        return "channels do not match the weight and groups"
    if w.scale.size > 1 and w.block_size is None and w.axis % w.q.ndim != 0:
        return "per-channel weight scales not on the output-channel axis"
    if w.block_size is not None and (w.axis % w.q.ndim != 1 or cin_g % w.block_size):
        return "blocked weight scales not along input channels in blocks that divide them"
    return None


def lower_conv(ctx: _Context, inputs, attr: dict, node: str | None):
    x, wv, bias = inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else None
    w = ctx.weights.get(wv)
    if w is None:
        return None
    x_shape = _shape(x)
    reason = why_not_lowered(x_shape, w, attr)
    if reason is not None:
        ctx.report.refuse("Conv", reason, node)
        return None
    bb = ctx.bb
    nd = len(x_shape) - 2
    kernel = list(w.q.shape[2:])
    strides = _ints(attr, "strides", [1] * nd)
    dilations = _ints(attr, "dilations", [1] * nd)
    pads = [0] * (2 * nd) if attr.get("auto_pad") in (b"VALID", "VALID") else _ints(attr, "pads", [0] * (2 * nd))
    spatial = [_static(d) for d in x_shape[2:]]
    out_sp = [(spatial[i] + pads[i] + pads[i + nd] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
              for i in range(nd)]
    groups, cout, cin_g = int(attr.get("group", 1)), w.q.shape[0], w.q.shape[1]
    geometry = (nd, kernel, strides, dilations, pads, out_sp)

    # the input as channels-last float (and codes, when it is carried quantized per tensor)
    act = ctx.acts.get(x)
    channels_last = [0, *range(2, nd + 2), 1]
    xf = bb.emit(relax.op.permute_dims(x, channels_last))
    xq = None
    if act is not None and act.kind == "tensor":
        codes = act.q if len(act.shape) == 2 else bb.emit(relax.op.reshape(act.q, act.shape))
        xq = bb.emit(relax.op.permute_dims(codes, channels_last))

    if groups > 1 and cin_g == 1:
        integer = xq is not None and act.dtype in ("int8", "uint8") and w.dtype in ("int8", "int4") and (
            w.block_size is None) and (w.zero_point is None or not np.any(np.asarray(w.zero_point).astype(np.int32)))
        y = (_depthwise_integer(ctx, xq, act, w, geometry, node) if integer
             else _depthwise(ctx, xf, w, geometry, node, quantized_input=act is not None))
    else:
        outs = []
        for g in range(groups):
            chans = (g * cin_g, (g + 1) * cin_g) if groups > 1 else None
            cols = _flat(bb, _im2col(bb, xf, geometry, chans, 0.0))
            if xq is not None:  # the same patches in code form, for a kernel that takes them
                zp = act.zero_point
                pad_value = float(zp.value.numpy().reshape(-1)[0]) if zp is not None else 0.0
                qcols = _flat(bb, _im2col(bb, xq, geometry, chans, pad_value))
                ctx.acts[cols] = QuantizedActivation(q=qcols, dtype=act.dtype, scale=act.scale,
                                                     zero_point=act.zero_point, kind="tensor", shape=_shape(qcols))
            out = lower_weight(ctx, cols, _group_weight(w, g, groups), transposed=False, pattern="Conv", node=node)
            if out is None:
                return None  # refused (recorded): TVM's float conv on the dequantized weights
            outs.append(out)
        y = outs[0] if len(outs) == 1 else bb.emit(relax.op.concat(outs, axis=-1))
        if node is not None and node in ctx.report.layers:
            rec = ctx.report.layers[node]
            rec["kernel"] = f"im2col + {rec['kernel']}" + (f" ({groups} groups)" if groups > 1 else "")
    batch = x_shape[0]
    y = bb.emit(relax.op.reshape(y, [batch, *out_sp, cout]))
    y = bb.emit(relax.op.permute_dims(y, [0, nd + 1, *range(1, nd + 1)]))
    if bias is not None:
        y = relax.op.add(y, relax.op.reshape(bias, [1, cout] + [1] * nd))
    ctx.report.fired[f"Conv[{nd}-D{', depthwise' if groups > 1 and cin_g == 1 else ''}]"] += 1
    return y


def _group_weight(w: ConstantDequantize, g: int, groups: int) -> ConstantDequantize:
    """Group g's weights as a 2-D [K, N] DequantizeLinear (MatMul layout: per-channel axis 1,
    blocks along axis 0), K = taps x input channels (tap-major)."""
    n = w.q.shape[0] // groups
    rows = slice(g * n, (g + 1) * n)

    def canonical(a: np.ndarray) -> np.ndarray:  # [n, c, *k] -> [*k, c, n] -> [K, n]
        moved = np.moveaxis(a[rows], (1, 0), (-2, -1))
        return np.ascontiguousarray(moved.reshape(-1, moved.shape[-1]))

    q = canonical(w.q)
    if w.scale.size == 1:
        return ConstantDequantize(q, w.dtype, w.scale, w.zero_point, 1, None)
    if w.block_size is None:  # per output channel
        zp = None if w.zero_point is None else w.zero_point.reshape(-1)[rows]
        return ConstantDequantize(q, w.dtype, w.scale.reshape(-1)[rows], zp, 1, None)
    zp = None if w.zero_point is None else canonical(w.zero_point)
    return ConstantDequantize(q, w.dtype, canonical(w.scale), zp, 0, w.block_size)


def _im2col(bb: relax.BlockBuilder, xl: relax.Expr, geometry, chans: tuple[int, int] | None,
            pad_value: float) -> relax.Expr:
    """[N, *S, C] channels-last -> patches [N, *OS, taps * C'] (C' the group's channels)."""
    nd, kernel, strides, dilations, pads, out_sp = geometry
    if chans is not None:
        xl = bb.emit(relax.op.strided_slice(xl, axes=[nd + 1], begin=[chans[0]], end=[chans[1]]))
    if any(pads):
        width = [0, 0] + [p for i in range(nd) for p in (pads[i], pads[i + nd])] + [0, 0]
        xl = bb.emit(relax.op.nn.pad(xl, width, pad_value=pad_value))
    taps = []
    for tap in itertools.product(*(range(k) for k in kernel)):
        begin = [t * d for t, d in zip(tap, dilations)]
        end = [b + (o - 1) * s + 1 for b, o, s in zip(begin, out_sp, strides)]
        whole = all(b == 0 and s == 1 for b, s in zip(begin, strides)) and _shape(xl)[1:nd + 1] == out_sp
        taps.append(xl if whole else bb.emit(relax.op.strided_slice(xl, axes=list(range(1, nd + 1)), begin=begin,
                                                                    end=end, strides=strides)))
    return taps[0] if len(taps) == 1 else bb.emit(relax.op.concat(taps, axis=-1))


def _flat(bb: relax.BlockBuilder, patches: relax.Expr) -> relax.Expr:
    return _flatten_rows(bb, patches)[0]


def _depthwise(ctx: _Context, xf: relax.Expr, w: ConstantDequantize, geometry, node: str | None,
               quantized_input: bool) -> relax.Expr:
    """Depthwise conv as taps x per-channel weights, summed: [M, C]. The weights stay as their
    stored codes plus scales and are dequantized in the graph."""
    bb = ctx.bb
    nd, kernel, *_ = geometry
    ntaps = int(np.prod(kernel))
    c = w.q.shape[0]
    codes = np.ascontiguousarray(w.q.reshape(c, ntaps).T)  # [taps, C]
    wf = relax.op.astype(relax.const(codes), "float32")
    if w.zero_point is not None:
        z = np.asarray(w.zero_point).astype(np.float32)
        wf = relax.op.subtract(wf, relax.const(z.reshape(1, -1) if z.size > 1 else z.reshape(())))
    s = np.asarray(w.scale, np.float32)
    if w.block_size is not None:  # blocks along one input channel: one scale per (channel, tap)
        s = s.reshape(c, ntaps).T
    wf = bb.emit(relax.op.multiply(wf, relax.const(s.reshape(1, -1) if s.ndim == 1 and s.size > 1 else s)))
    patches = _im2col(bb, xf, geometry, None, 0.0)  # [N, *OS, taps * C], tap-major
    rows = _flat(bb, patches)
    m = _shape(rows)[0]
    taps = bb.emit(relax.op.reshape(rows, [m, ntaps, c]))
    y = bb.emit(relax.op.sum(relax.op.multiply(taps, wf), axis=[1]))
    reason = ("depthwise: taps x per-channel weights summed in float, weights dequantized in the graph from their "
              f"stored {w.dtype} codes" + ("; the quantized input is read dequantized" if quantized_input else ""))
    if node is not None:
        ctx.report.layers[node] = {"kernel": f"depthwise float x {w.dtype} (dequantized in graph)",
                                   "activation": "float32", "status": "emulated", "reason": reason,
                                   "rule": None, "rules_refused": []}
    return y


def _depthwise_integer(ctx: _Context, xq: relax.Expr, act: QuantizedActivation, w: ConstantDequantize, geometry,
                       node: str | None) -> relax.Expr:
    """Depthwise conv on codes: y[m, c] = s_x * s_w[c] * sum_t (x_q - z)[m, t, c] * w_q[t, c] in
    int32 (exact), [M, C] float32. The input patches are its codes padded with the zero point."""
    bb = ctx.bb
    nd, kernel, *_ = geometry
    ntaps = int(np.prod(kernel))
    c = w.q.shape[0]
    codes = np.ascontiguousarray(w.q.reshape(c, ntaps).T.astype(np.int32))  # [taps, C]
    pad_value = float(act.zero_point.value.numpy().reshape(-1)[0]) if act.zero_point is not None else 0.0
    rows = _flat(bb, _im2col(bb, xq, geometry, None, pad_value))
    m = _shape(rows)[0]
    taps = relax.op.astype(bb.emit(relax.op.reshape(rows, [m, ntaps, c])), "int32")
    if act.zero_point is not None:
        taps = relax.op.subtract(taps, relax.op.astype(act.zero_point, "int32"))
    acc = bb.emit(relax.op.sum(relax.op.multiply(taps, relax.const(codes)), axis=[1]))  # [M, C] int32
    s_w = np.asarray(w.scale, np.float32)  # per tensor or per output channel (the caller checked)
    scale = relax.op.multiply(act.scale, relax.const(s_w.reshape(-1) if s_w.size > 1 else s_w.reshape(1)))
    y = bb.emit(relax.op.multiply(relax.op.astype(acc, "float32"), scale))
    if node is not None:
        ctx.report.layers[node] = {"kernel": f"depthwise integer taps {act.dtype} x {w.dtype}", "activation": act.dtype,
                                   "status": "native", "reason": None, "rule": None, "rules_refused": []}
    return y
