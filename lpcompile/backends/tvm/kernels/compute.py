"""Compute definitions (TE -> TIR PrimFunc) of the low-precision kernels, shared by every target.

Every matmul kernel has the same three-stage structure, which the schedules rely on:

    decode[k, n]    = the weight value as an integer or float, without its scale (injective)
    acc[m, b, n]    = sum over the K-block b of  x[m, k] * decode[k, n]        (fp32 or int32)
    y[m, n]         = sum over blocks b of  acc[m, b, n] * w_scale[b, n]  (* activation scale)

Taking the per-block scale out of the inner loop saves a multiply per weight; integer
accumulators (int8 x int8, int8 x int4) are exact per block and only the final scaling is
floating point. A per-channel (or per-tensor) weight scale is a single block spanning K.

Which (activation, weight) pairs exist is a table (`PAIRS`), not a ladder: floating
activations with any weight format (weight-only dequantization in registers), int8 activations
with int8/int4 weights (integer accumulation), fp8 activations with fp8 weights.

The kernels take the weights in the layouts of `packing`: int4 as `NibbleLayout` tiles, 8-bit
weights row-major [K_pad, N]. Dimension m (rows = tokens) may be symbolic.

Kernels name their operands by TVM dtype ("int8", "float8_e4m3fn", ...); ranges, FP8 bit
layouts and largest finite values come from `lpcompile.formats` (`KERNEL_FORMATS`), never
restated here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import te, tirx

from lpcompile.backends.tvm.kernels.packing import DOT4, NIB8, NIBBLE, NibbleLayout, ceil_div
from lpcompile.errors import TargetError
from lpcompile.formats import FP8_E4M3, FP8_E5M2, INT4, INT8, MIN_SCALE, UINT4, UINT8, FloatFormat, IntFormat

KERNEL_ATTR = "lpcompile.kernel"

# The number formats the kernels take, by TVM dtype (TVM names its dtypes as ml_dtypes does).
KERNEL_FORMATS: dict[str, IntFormat | FloatFormat] = {
    f.dtype_name: f for f in (INT4, UINT4, INT8, UINT8, FP8_E4M3, FP8_E5M2)
}
FLOAT8: dict[str, FloatFormat] = {d: f for d, f in KERNEL_FORMATS.items() if isinstance(f, FloatFormat)}
INT_RANGE = {d: (KERNEL_FORMATS[d].qmin, KERNEL_FORMATS[d].qmax) for d in ("int8", "uint8")}
# Per-token codes: int4 activations are held one per int8 (the int8 x weight kernels take them as
# they are; their range is a subset), so only the grid differs.
ROW_CODES = {d: (KERNEL_FORMATS[d].qmin, KERNEL_FORMATS[d].qmax) for d in ("int8", "int4")}
ROW_TILE = 4  # symbolic row counts are padded to this for the accumulation


@dataclass(frozen=True)
class Pair:
    """How one (activation, weight) pair multiplies: accumulator dtype and activation scaling."""

    acc: str  # "float32" or "int32"
    act_scale: str  # "none" (float activations), "tensor" (static scalar) or "row" (per token)


PAIRS: dict[tuple[str, str], Pair] = {
    **{("float32", w): Pair("float32", "none") for w in ("int4", "int8", *FLOAT8)},
    ("int8", "int8"): Pair("int32", "tensor"),
    ("uint8", "int8"): Pair("int32", "tensor"),  # W8A8 with asymmetric activations (VNNI's u8 x s8)
    ("int8", "int4"): Pair("int32", "row"),  # W4A8: dynamic per-token int8 activations
    **{(a, w): Pair("float32", "tensor") for a in FLOAT8 for w in FLOAT8},
}


def dim(v: int | tirx.PrimExpr | None, name: str = "m") -> tirx.PrimExpr:
    """An int64 extent: an int, an existing expression, or (None) a fresh symbolic variable."""
    if v is None:
        return tirx.Var(name, "int64")
    if isinstance(v, int):
        return tirx.IntImm("int64", v)
    return v


def _decode_int4(packed: te.Tensor, layout: NibbleLayout, dtype: str):
    tile, lanes = layout.tile, layout.lanes

    def f(k, n):
        j = n % tile
        word = packed[n // tile, k, j % lanes].astype("int32")
        # nibble h = j // lanes: move it to the top 4 bits, then arithmetic-shift it down
        return ((word << (28 - 4 * (j // lanes)).astype("int32")) >> 28).astype(dtype)

    return f


def quantized_matmul(
    m: int | tirx.PrimExpr | None,
    k: int,
    n: int,
    *,
    weight: str,
    activation: str = "float32",
    block_size: int | None = None,
    accumulator_only: bool = False,
    layout: NibbleLayout = NIBBLE,
    dot4: bool = False,
) -> tirx.PrimFunc:
    """y[m, n] = x[m, k] @ dequant(w)[k, n], with the quantized operands decoded in the kernel.

    Parameters, in order: x [m, k] (`activation` dtype); for int8 activations with a tensor
    scale x_scale [1] float32 and x_zero_point [1] of their dtype (int8 / uint8), for per-token ones x_scale [m]; for
    fp8 activations x_scale [1]; then the weight (int4: uint32 `layout.packed_shape`; int8 with
    `dot4`: `DOT4.packed_shape` for dot-product instructions, and int4 with `dot4` and int8
    activations: uint8 `NIB8.packed_shape`; others [K_pad, N] of their dtype),
    w_scale [ceil(K / block), N] float32, for integer activations with a zero point w_colsum
    [ceil(K / block), N] int32 (the weights' sums per block: the zero point is applied once per
    output, sum (x - z) w = sum x w - z sum w, so the inner loop is a plain integer dot product),
    and the output y [m, n] float32. `block_size=None` means one block over K (per-channel /
    per-tensor scales). `accumulator_only` (integer pairs) drops the scales and returns
    acc [m, blocks, N] int32: the exact integer result, for tests.
    """
    pair = PAIRS.get((activation, weight))
    if pair is None:
        raise TargetError(f"no kernel multiplies {activation} activations by {weight} weights")
    if accumulator_only and pair.acc != "int32":
        raise TargetError("accumulator_only needs an integer (activation, weight) pair")
    block = k if block_size is None else block_size
    nb = ceil_div(k, block)
    k_pad = nb * block
    m_, k_, n_ = dim(m), dim(k), dim(n)

    x = te.placeholder((m_, k_), activation, name="x")
    inputs = [x]
    x_scale = x_zp = None
    if pair.act_scale == "tensor":
        x_scale = te.placeholder((dim(1),), "float32", name="x_scale")
        inputs.append(x_scale)
        if activation in INT_RANGE:
            x_zp = te.placeholder((dim(1),), activation, name="x_zero_point")
            inputs.append(x_zp)
    elif pair.act_scale == "row":
        x_scale = te.placeholder((m_,), "float32", name="x_scale")
        inputs.append(x_scale)

    if weight == "int4" and dot4:
        if activation != "int8" or k_pad % NIB8.group:
            raise TargetError(f"the nibble8 layout serves int8 activations with K padded to {NIB8.group}")
        w = te.placeholder(tuple(dim(d) for d in NIB8.packed_shape(k_pad, n)), "uint8", name="w")

        def decode_f(kk, nn):
            byte = w[nn // NIB8.lanes, kk // NIB8.group, nn % NIB8.lanes, kk % 4].astype("int32")
            return ((byte >> (kk % NIB8.group // 4 * 4)) & 15) - NIB8.offset
    elif weight == "int4":
        w = te.placeholder(tuple(dim(d) for d in layout.packed_shape(k_pad, n)), "uint32", name="w")
        decode_f = _decode_int4(w, layout, pair.acc)
    elif dot4:
        if weight not in ("int8", *FLOAT8) or k_pad % DOT4.group:
            raise TargetError(f"the dot4 layout holds 8-bit weights with K padded to {DOT4.group} (got {weight}, K_pad {k_pad})")
        w = te.placeholder(tuple(dim(d) for d in DOT4.packed_shape(k_pad, n)), weight, name="w")

        def decode_f(kk, nn):
            v = w[nn // DOT4.lanes, kk // DOT4.group, nn % DOT4.lanes, kk % DOT4.group]
            return fp8_to_float32(v, weight) if weight in FLOAT8 else v.astype(pair.acc)
    elif weight in FLOAT8:
        w = te.placeholder((dim(k_pad), n_), weight, name="w")
        decode_f = lambda kk, nn: fp8_to_float32(w[kk, nn], weight)  # noqa: E731
    else:
        w = te.placeholder((dim(k_pad), n_), weight, name="w")
        decode_f = lambda kk, nn: w[kk, nn].astype(pair.acc)  # noqa: E731
    w_scale = te.placeholder((dim(nb), n_), "float32", name="w_scale")
    inputs += [w, w_scale]
    w_colsum = None
    if x_zp is not None:
        w_colsum = te.placeholder((dim(nb), n_), "int32", name="w_colsum")
        inputs.append(w_colsum)
    decode = te.compute((dim(k_pad), n_), decode_f, name="decode")

    # A symbolic row count is padded to whole ROW_TILEs for the accumulation (the padding rows
    # repeat the last row and are dropped by a final copy): the schedules' row micro-tiles then
    # need no bounds checks and their registers a fixed size. Static row counts are not padded.
    padded = not isinstance(m_, tirx.IntImm) and not accumulator_only
    rows = tirx.floordiv(m_ + ROW_TILE - 1, ROW_TILE) * ROW_TILE if padded else m_

    def row(i):
        return tirx.min(i, m_ - 1) if padded else i

    def x_value(i, kk):
        i = row(i)
        v = fp8_to_float32(x[i, kk], activation) if activation in FLOAT8 else x[i, kk].astype(pair.acc)
        if k_pad != k:  # ragged last block: x has no columns there (the weights are zero)
            v = tirx.if_then_else(kk < k_, v, tirx.const(0, pair.acc))
        return v

    r = te.reduce_axis((dim(0), dim(block)), name="kk")
    acc = te.compute(
        (rows, dim(nb), n_),
        lambda i, b, j: te.sum(x_value(i, b * block + r) * decode[b * block + r, j], axis=r),
        name="acc",
    )
    def acc_value(i, b, j):  # the zero point's share, once per output and block
        if w_colsum is None:
            return acc[i, b, j]
        return acc[i, b, j] - x_zp[0].astype("int32") * w_colsum[b, j]

    if accumulator_only:
        out = acc if w_colsum is None else te.compute(acc.shape, acc_value, name="acc_zp")
    else:
        rb = te.reduce_axis((dim(0), dim(nb)), name="b")

        def y_f(i, j):
            term = acc_value(i, rb, j).astype("float32") * w_scale[rb, j]
            if pair.act_scale == "tensor":
                term = term * x_scale[0]
            elif pair.act_scale == "row":
                term = term * x_scale[row(i)]
            return te.sum(term, axis=rb)

        if padded:
            y_rows = te.compute((rows, n_), y_f, name="y_rows")
            out = te.compute((m_, n_), lambda i, j: y_rows[i, j], name="y")
        else:
            out = te.compute((m_, n_), y_f, name="y")
    func = te.create_prim_func([*inputs, out])
    return func.with_attr(
        {
            KERNEL_ATTR: "quantized_matmul",
            "lpcompile.weight": weight,
            "lpcompile.activation": activation,
            "lpcompile.tile_n": layout.tile if weight == "int4" else 128,
            "lpcompile.lanes": layout.lanes if weight == "int4" else 16,
            "lpcompile.k": k,
            "lpcompile.n": n,
            "lpcompile.block": block,
            "lpcompile.dot4": dot4,
        }
    )


def quantize_tensor(m: int | tirx.PrimExpr | None, k: int, dtype: str) -> tirx.PrimFunc:
    """QuantizeLinear with a scalar scale: x [m, k] float32, scale [1], (int: zero_point [1]).

    Integers: saturate(round_half_even(x / scale) + zero_point). Float8: the nearest value of
    x / scale, saturated to the format's largest finite value (ONNX `saturate=1`).
    """
    m_, k_ = dim(m), dim(k)
    x = te.placeholder((m_, k_), "float32", name="x")
    scale = te.placeholder((dim(1),), "float32", name="scale")
    if dtype in INT_RANGE:
        zp = te.placeholder((dim(1),), dtype, name="zero_point")
        lo, hi = INT_RANGE[dtype]
        q = te.compute(
            (m_, k_),
            lambda i, j: _saturate_int(tirx.nearbyint(x[i, j] / scale[0]) + zp[0].astype("float32"), lo, hi, dtype),
            name="quantize",
        )
        args = [x, scale, zp, q]
    elif dtype in FLOAT8:
        q = te.compute((m_, k_), lambda i, j: _saturate_float8(x[i, j] / scale[0], dtype), name="quantize")
        args = [x, scale, q]
    else:
        raise TargetError(f"no quantize kernel for {dtype}")
    return te.create_prim_func(args).with_attr({KERNEL_ATTR: "quantize_tensor"})


def quantize_rows(m: int | tirx.PrimExpr | None, k: int, dtype: str = "int8") -> tirx.PrimFunc:
    """Dynamic per-token quantization (the `PerTokenQDQ_int8` / `_int4` functions): for each row,
    scale = max(max|x| / qmax, formats.MIN_SCALE), q = saturate(round_half_even(x / scale)), qmax 127 or 7.

    x [m, k] float32 -> q [m, k] int8 (int4 codes held in int8), scale [m] float32.
    """
    if dtype not in ROW_CODES:
        raise TargetError(f"no per-token quantize kernel for {dtype}")
    lo, hi = ROW_CODES[dtype]
    m_, k_ = dim(m), dim(k)
    x = te.placeholder((m_, k_), "float32", name="x")
    r = te.reduce_axis((dim(0), k_), name="k")
    amax = te.compute((m_,), lambda i: te.max(tirx.abs(x[i, r]), axis=r), name="amax")

    def row_scale(i):
        return tirx.max(amax[i] / tirx.const(float(hi), "float32"), tirx.const(MIN_SCALE, "float32"))

    q = te.compute(
        (m_, k_), lambda i, j: _saturate_int(tirx.nearbyint(x[i, j] / row_scale(i)), lo, hi, "int8"), name="quantize"
    )
    scale = te.compute((m_,), row_scale, name="row_scale")
    return te.create_prim_func([x, q, scale]).with_attr({KERNEL_ATTR: "quantize_rows"})


# --- the online Hadamard transform (`ai.lpcompile::Hadamard`) ---------------------------------

RADIX = 16  # the lowest log2(RADIX) butterfly stages are done as one radix-16 step


def hadamard_transform(
    rows: int | tirx.PrimExpr | None,
    n: int,
    *,
    sylvester: int,
    dense: int = 1,
    inner: int = 1,
    signs: bool = False,
) -> tirx.PrimFunc:
    """y = (x ⊙ signs) · diag(H, ..., H) over the last axis of x [rows, n], H = A ⊗ S_t/√t ⊗ I_u,
    with S_t the ±1 Sylvester matrix of order t = `sylvester` (a power of two), A a dense
    `dense` × `dense` matrix (the orthonormal Paley factor; dense = 1: none) and I_u an identity
    of order u = `inner` (u > 1: the transform across attention heads of u channels each);
    the block m·t·u divides n.

    Viewed as [n / (m·t·u), m, t, u], a block X becomes Aᵀ · X · S_t / √t on the (m, t) axes for
    every u-channel. X · S_t is a fast Walsh–Hadamard transform in log2(t) butterfly stages:

        signed[j]      = x[j] · signs[j]                               (only with `signs`)
        radix[j]       = Σ_q S_r[q, j mod r] · signed[r⌊j/r⌋ + q] / √t   (u = 1, r = min(16, t):
                         the low log2 r stages at once, a 16-point transform in vector registers;
                         u > 1: signed / √t)
        butterfly_k[j] = prev[j ± h] ± prev[j]        h = r·2^k (u > 1: u·2^k): a + b on the low
                         half of each 2h-span, a − b on the high half (operands in bounds, no
                         branches)
        mix[j]         = Σ_q a_t[p, q] · z[(block·m + q)·tu + j mod tu]    tu = t·u, p = ⌊j/tu⌋ mod m

    O(n log t + n·m) per row instead of O(n²). Parameters in order: x [rows, n] float32,
    signs [n] (if `signs`), a_t = Aᵀ [m, m] (if m > 1), y [rows, n]. The stages are blocks named
    "signed", "radix", "butterfly0", ..., "mix" (the last one writes y), which the schedules rely on;
    attribute `lpcompile.span` is the first butterfly's h.
    """
    t, m, u = sylvester, dense, inner
    if t < 1 or t & (t - 1) or m < 1 or u < 1 or n % (m * t * u):
        raise TargetError(f"hadamard_transform: need t a power of two and m·t·u | n (n={n}, m={m}, t={t}, u={u})")
    rows_, n_ = dim(rows), dim(n)
    x = te.placeholder((rows_, n_), "float32", name="x")
    params = [x]
    sg = at = None
    if signs:
        sg = te.placeholder((n_,), "float32", name="signs")
        params.append(sg)
    if m > 1:
        at = te.placeholder((dim(m), dim(m)), "float32", name="a_t")
        params.append(at)
    r = min(RADIX, t) if u == 1 else 1
    scale = tirx.const(1.0 / t**0.5, "float32")

    x_in = x
    if sg is not None:  # its own stage: one vector multiply per 16 lanes, not one per radix term
        x_in = te.compute((rows_, n_), lambda i, j: x[i, j] * sg[j], name="signed")

    def x_value(i, j):
        return x_in[i, j]

    if r > 1:
        q = te.reduce_axis((dim(0), dim(r)), name="q")
        z = te.compute(
            (rows_, n_),
            lambda i, j: te.sum(_walsh_sign(q, j % r, r) * scale * x_value(i, j // r * r + q), axis=q),
            name="radix",
        )
    else:
        z = te.compute((rows_, n_), lambda i, j: x_value(i, j) * scale, name="radix")
    span = r * u
    h, k = span, 0
    while h < t * u:
        z = te.compute((rows_, n_), _butterfly(z, h), name=f"butterfly{k}")
        h, k = 2 * h, k + 1
    if m > 1:
        qa = te.reduce_axis((dim(0), dim(m)), name="qa")
        tu = t * u
        mtu, z_in = m * tu, z
        z = te.compute(
            (rows_, n_),
            lambda i, j: te.sum(at[j // tu % m, qa] * z_in[i, j // mtu * mtu + qa * tu + j % tu], axis=qa),
            name="mix",
        )
    func = te.create_prim_func([*params, z])
    return func.with_attr({KERNEL_ATTR: "hadamard", "lpcompile.n": n, "lpcompile.dense": m, "lpcompile.sylvester": t,
                           "lpcompile.inner": u, "lpcompile.span": span})


def _walsh_sign(q, p, r: int):
    """S_r[q, p] = (−1)^popcount(q & p) as float32 (constant once q and p are unrolled/lanes)."""
    b = q & p
    parity = b & 1
    for s in range(1, r.bit_length() - 1):
        parity = parity ^ ((b >> s) & 1)
    return (1 - 2 * parity).astype("float32")


def _butterfly(prev: te.Tensor, h: int):
    def f(i, j):
        high = j // h % 2  # 0: a + b (partner j + h), 1: a − b (partner j − h)
        return prev[i, j + h - 2 * h * high] + (1 - 2 * high).astype("float32") * prev[i, j]

    return f


def _saturate_int(v, lo: int, hi: int, dtype: str):
    return tirx.max(tirx.min(v, tirx.const(float(hi), "float32")), tirx.const(float(lo), "float32")).astype(dtype)


def _saturate_float8(v, dtype: str):
    return float32_to_fp8(v, dtype)


# FP8 <-> fp32 with integer operations only. TVM 0.27's own float8 casts are not usable: on
# LLVM the fp8 -> fp32 cast decodes zero and subnormals as if they were normal numbers (0 ->
# 2^-7 for E4M3) and NaN/inf as finite values, and the fp32 -> fp8 cast does not vectorize.
# These are exact (round to nearest even, saturating like ONNX `saturate=1`), vectorize, and
# avoid denormal fp32 values, so flush-to-zero modes cannot change them.


def _u32(v: int):
    return tirx.const(v, "uint32")


F32_MAN, F32_BIAS = 23, 127  # float32's mantissa bits and exponent bias


def _magnitude_mask(f: FloatFormat) -> int:
    return (1 << (f.exp_bits + f.man_bits)) - 1  # every bit but the sign


def fp8_to_float32(value, dtype: str):
    """The exact fp32 value of an FP8 element (`value` is an expression of dtype `dtype`)."""
    f = FLOAT8[dtype]
    b = tirx.reinterpret("uint8", value).astype("uint32")
    mag = b & _u32(_magnitude_mask(f))
    sign = (b & _u32(1 << (f.bits - 1))) << _u32(32 - f.bits)
    normal = tirx.reinterpret("float32", (mag << _u32(F32_MAN - f.man_bits)) + _u32((F32_BIAS - f.bias) << F32_MAN))
    subnormal = mag.astype("float32") * tirx.const(f.min_subnormal, "float32")
    v = _select(mag < _u32(1 << f.man_bits), subnormal, normal)
    if f.has_inf:  # E5M2: the top exponent is inf (mantissa 0) or NaN
        v = _select(mag >= _u32(f.inf_code), _select(mag == _u32(f.inf_code), tirx.const(float("inf"), "float32"), tirx.const(float("nan"), "float32")), v)
    else:  # E4M3FN: only S.1111.111 is special (NaN)
        v = _select(mag == _u32(f.nan_code), tirx.const(float("nan"), "float32"), v)
    return tirx.reinterpret("float32", tirx.reinterpret("uint32", v) | sign)


def float32_to_fp8(v, dtype: str):
    """fp32 -> FP8, round to nearest even, saturating to the largest finite value, NaN -> NaN.

    A NaN is written with every magnitude bit set (S.1111.111, S.11111.11), a NaN in both formats
    (E4M3FN's only one; `formats.FP8_E5M2.nan_code`, as ml_dtypes, is S.11111.10)."""
    f = FLOAT8[dtype]
    bits = tirx.reinterpret("uint32", v)
    sign = (bits >> _u32(32 - f.bits)) & _u32(1 << (f.bits - 1))
    a = tirx.min(tirx.abs(v), tirx.const(f.max_finite, "float32"))
    abits = tirx.reinterpret("uint32", a)
    shift = F32_MAN - f.man_bits
    # normal: round the fp32 mantissa to `man` bits (ties to even), then rebias the exponent
    rounded = (abits + _u32((1 << (shift - 1)) - 1) + ((abits >> _u32(shift)) & _u32(1))) >> _u32(shift)
    normal = rounded - _u32((F32_BIAS - f.bias) << f.man_bits)
    # subnormal: a multiple of the smallest subnormal step, rounded to nearest even
    subnormal = tirx.nearbyint(a * tirx.const(1.0 / f.min_subnormal, "float32")).astype("uint32")
    code = _select(a < tirx.const(f.min_normal, "float32"), subnormal, normal)
    is_nan = (bits & _u32(0x7FFFFFFF)) > _u32(0x7F800000)  # not `v != v`: TVM folds that to false
    code = _select(is_nan, _u32(_magnitude_mask(f)), code)
    return tirx.reinterpret(dtype, (code | sign).astype("uint8"))


def _select(cond, t, f):
    # Select, not if_then_else: both sides are cheap and side-effect free, and TVM vectorizes
    # Select into a blend (a vector if_then_else condition fails to vectorize on LLVM).
    return tirx.Select(cond, t, f)


def has_block(sch, name: str) -> bool:
    """Whether a schedule of one of these computes has the block `name` (the blocks present
    depend on the kernel's options: padded rows, accumulator-only)."""
    try:
        sch.get_sblock(name)
    except Exception:  # TVM raises its own error type for a missing block
        return False
    return True


# --- QuantizeLinear / DequantizeLinear in general -------------------------------------------------
# Any rank, scalar / per-axis / blocked scales and zero points given at run time: what a QDQ graph
# holds outside the fused linear layers, and what ONNX's own node tests exercise. 4-bit codes
# travel one per byte (int8 / uint8 storage); `code` names the real type, which sets the range.

CODE_RANGE = {**{d: (f.qmin, f.qmax) for d, f in KERNEL_FORMATS.items() if isinstance(f, IntFormat)},
              **{d: (int(np.iinfo(d).min), int(np.iinfo(d).max)) for d in ("int16", "uint16")}}
CODE_STORAGE = {"int4": "int8", "uint4": "uint8"}


def code_storage(code: str) -> str:
    """The TVM dtype that holds codes of ONNX type `code` (4-bit codes: one per byte)."""
    return CODE_STORAGE.get(code, code)


def _scale_index(idx, axis: int | None, block: int | None, rank: int):
    """The element of a scale / zero point (of rank `rank`) that x[idx] uses: the single one, the
    one of idx[axis], or (blocked) idx with idx[axis] // block."""
    if axis is None:
        return (0,) * rank
    if block:
        return tuple(tirx.floordiv(v, block) if d == axis else v for d, v in enumerate(idx))
    return (idx[axis],)


def _code_value(v, code: str):
    return fp8_to_float32(v, code) if code in FLOAT8 else v.astype("float32")


def dequantize_linear(shape, code: str, scale_shape, zero_point_shape=None, *, axis: int | None,
                      block: int | None, out_dtype: str = "float32") -> tirx.PrimFunc:
    """y = (x - zero_point) * scale elementwise (ONNX DequantizeLinear), x of type `code`.

    Parameters: x `shape` (its storage dtype), scale `scale_shape` (`out_dtype`), [zero_point
    `zero_point_shape`, None: no zero point], y `shape` `out_dtype`. `axis=None`: one scale (shape
    [] or [1])."""
    if code not in CODE_RANGE and code not in FLOAT8:
        raise TargetError(f"no DequantizeLinear kernel for {code}")
    shape = [dim(d) for d in shape]
    sshape = [dim(d) for d in scale_shape]
    zshape = None if zero_point_shape is None else [dim(d) for d in zero_point_shape]
    x = te.placeholder(shape, code_storage(code), name="x")
    scale = te.placeholder(sshape, out_dtype, name="scale")
    zp = te.placeholder(zshape, code_storage(code), name="zero_point") if zshape is not None else None

    def f(*idx):
        v = _code_value(x[idx], code)
        if zp is not None:
            v = v - _code_value(zp[_scale_index(idx, axis, block, len(zshape))], code)
        return (v * scale[_scale_index(idx, axis, block, len(sshape))].astype("float32")).astype(out_dtype)

    y = te.compute(shape, f, name="elementwise")
    args = [x, scale] + ([zp] if zp is not None else []) + [y]
    return te.create_prim_func(args).with_attr({KERNEL_ATTR: "elementwise"})


def quantize_linear(shape, code: str, scale_shape, zero_point_shape=None, *, axis: int | None,
                    block: int | None, in_dtype: str = "float32") -> tirx.PrimFunc:
    """q = saturate(round_half_even(x / scale) + zero_point) elementwise (ONNX QuantizeLinear,
    saturate=1 for float8: the nearest value, clipped to the largest finite one).

    Parameters: x `shape` `in_dtype`, scale `scale_shape` `in_dtype`, [zero_point
    `zero_point_shape`], q `shape` (storage of `code`)."""
    if code not in CODE_RANGE and code not in FLOAT8:
        raise TargetError(f"no QuantizeLinear kernel for {code}")
    shape = [dim(d) for d in shape]
    sshape = [dim(d) for d in scale_shape]
    zshape = None if zero_point_shape is None else [dim(d) for d in zero_point_shape]
    x = te.placeholder(shape, in_dtype, name="x")
    scale = te.placeholder(sshape, in_dtype, name="scale")
    zp = te.placeholder(zshape, code_storage(code), name="zero_point") if zshape is not None else None

    def f(*idx):
        v = x[idx].astype("float32") / scale[_scale_index(idx, axis, block, len(sshape))].astype("float32")
        z = _code_value(zp[_scale_index(idx, axis, block, len(zshape))], code) if zp is not None else None
        if code in FLOAT8:  # (ONNX float8 zero points are 0; added for the formula's sake)
            return float32_to_fp8(v + z if z is not None else v, code)
        lo, hi = CODE_RANGE[code]
        v = tirx.nearbyint(v)
        if z is not None:
            v = v + z
        return _saturate_int(v, lo, hi, code_storage(code))

    q = te.compute(shape, f, name="elementwise")
    args = [x, scale] + ([zp] if zp is not None else []) + [q]
    return te.create_prim_func(args).with_attr({KERNEL_ATTR: "elementwise"})


def hadamard_stages(sch) -> list[str]:
    """The stage blocks of a `hadamard_transform` schedule, first to last (the last writes y)."""
    names = (["signed"] if has_block(sch, "signed") else []) + ["radix"]
    names += [f"butterfly{k}" for k in range(32) if has_block(sch, f"butterfly{k}")]
    return names + (["mix"] if has_block(sch, "mix") else [])
