"""Numeric formats and quantization specs, each defined once with bit-exact reference numerics.

Formats
-------
`IntFormat` (2..8-bit, signed or unsigned) and `FloatFormat` (minifloats: exponent bits, mantissa
bits, bias, whether there is an inf, how NaN is encoded, and the *stated* largest finite value,
which is checked against the encoding when the format is built). Every format offers, on numpy
arrays and without per-element Python loops:

- `quantize(x) -> float32`: `x` (already divided by its scale) rounded once to the nearest
  representable value, ties to even, *saturating* at ±max_finite (as ONNX QuantizeLinear with
  saturate=1). Float64 input is rounded directly (no intermediate float32 rounding).
- `encode(x)`: storage codes of `quantize(x)` (ints: values in `numpy_dtype`; floats: uint8 bit
  patterns sign|exponent|mantissa, right-aligned for sub-byte formats).
- `decode(codes) -> float32`: the inverse of `encode`.
- `to_storage(x)`: `quantize(x)` in `numpy_dtype`, ready for an ONNX tensor.

Special values (the choices are tested in tests/test_formats.py):

- inf saturates to ±max_finite for every float format, including E5M2 which has an inf
  (ONNX saturate=1 semantics); `decode` still maps E5M2's inf codes to ±inf.
- NaN stays NaN where the format has a NaN (sign kept). Formats without NaN (FP4 E2M1, FP6, the
  ExMy family) map NaN to +0.0, as ml_dtypes and hence ONNX's reference QuantizeLinear do for
  float4/float6 (ml_dtypes returns a zero whose sign bit is the inverse of the NaN's; we always
  return +0, whose value is the same). Integer formats refuse NaN with `FormatError`.
- fnuz formats (E4M3FNUZ, E5M2FNUZ) have no -0: a negative value that rounds to zero gives +0.
- E8M0 (the MX scale format: unsigned, all codes powers of two, 0xFF is NaN, no zero) rounds to
  nearest with ties *up* (1.5 -> 2, 3 -> 4). That is what round-half-even of the significand
  gives when there are no mantissa bits (the significand 2 is even, 1 is odd), and it is what
  ml_dtypes and ONNX Cast(round_mode="nearest") do. Values at or below 2^-127, including 0,
  saturate to 2^-127 (ONNX saturate semantics; ml_dtypes gives NaN for 0), values above 2^127
  and +inf to 2^127, negative values (no sign bit) give NaN. One deliberate difference from
  ml_dtypes: float32 *subnormal* inputs in (2^-127, 1.5 * 2^-127) round to the nearer 2^-127,
  where ml_dtypes (and ONNX's to_float8e8m0) round the raw float32 bit pattern up to 2^-126. Note the OCP MX recipe derives the
  shared scale as 2^floor(log2(amax)) - emax, and ONNX Cast defaults to round_mode="up": both are
  scale-selection policies, not this format's round-to-nearest.

The ExMy family of "FP8 Quantization: The Power of the Exponent" (Kuzmin et al. 2022) is
`fp8_exmy(e, m)` (e + m = 7, 1 <= e <= 6), named "e2m5", "e3m4", "e4m3", "e5m2", ...: a sign bit,
bias 2^(e-1)-1, IEEE-style subnormals and *no* code reserved for inf or NaN, so the largest value
is (2 - 2^-m) * 2^(2^e - 1 - bias) (E3M4: 31, E4M3: 480, E5M2: 114688). The paper's flexible
per-tensor bias is played here by the per-tensor/per-channel scale. This differs from ml_dtypes'
float8_e3m4 / float8_e4m3, which are IEEE-like (exponent all ones reserved for inf/NaN, max 15.5
/ 240), and from E4M3FN ("fp8_e4m3", max 448) and E5M2 ("fp8_e5m2", max 57344): below the
ml_dtypes maximum the grids agree, above it only ExMy has values. ExMy formats have no ONNX or
numpy type (`onnx_type` and `numpy_dtype` are None).

Granularity and the axis convention
-----------------------------------
`PerTensor()`, `PerChannel(axis)`, `PerBlock(axis, size)` and `PerToken()`. `axis` means what ONNX
DequantizeLinear's `axis` means: for `PerChannel` the axis along which the scale varies (one scale
per index of that axis), for `PerBlock` the axis along which blocks of `size` consecutive
elements share a scale. For linear-layer weights lpcompile uses the MatMul layout [K (in),
N (out)], so `PerBlock(0, 128)` ("block(0,128)") is blocks of 128 input features per output
channel, and `PerChannel(1)` ("channel(1)") is one scale per output channel. `PerToken()`
("token") is for activations quantized at run time: one scale per row of the last axis (the
scale varies along every axis but the last); it requires `dynamic=True`.

QuantSpec and its printed form
------------------------------
    spec    := format ":" gran ":" ("sym" | "asym") [":" method] [":scale=" format] [":dynamic"]
    gran    := "tensor" | "channel(" axis ")" | "block(" axis "," size ")" | "token"
    method  := "minmax" | "mse" | "percentile(" P ")"          (0 < P <= 100)

e.g. "int4:block(0,128):sym", "int8:tensor:asym:percentile(99.99)", "int8:token:sym:dynamic",
"fp4_e2m1:block(1,32):sym:scale=e8m0". `str(spec)` prints the granularity and symmetry always and
the other fields only when not default; `QuantSpec.parse` accepts the fields after the format in
that order, each optional (defaults: tensor, sym, minmax), and `QuantSpec.parse(str(s)) == s`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal, Union

import ml_dtypes
import numpy as np
import onnx_ir as ir

from lpcompile.errors import FormatError

__all__ = [
    "E8M0",
    "FORMATS",
    "FP4_E2M1",
    "FP6_E2M3",
    "FP6_E3M2",
    "FP8_E4M3",
    "FP8_E4M3FNUZ",
    "FP8_E5M2",
    "FP8_E5M2FNUZ",
    "INT2",
    "INT4",
    "INT8",
    "MIN_SCALE",
    "UINT2",
    "UINT4",
    "UINT8",
    "FloatFormat",
    "Format",
    "Granularity",
    "IntFormat",
    "PerBlock",
    "PerChannel",
    "PerTensor",
    "PerToken",
    "QuantSpec",
    "asymmetric_scale_zero_point",
    "fp8_exmy",
    "get_format",
    "symmetric_scale",
]


def _as_float(x) -> np.ndarray:
    """`x` as a float64 array (float16/32/64, ml_dtypes floats, ints, Python scalars)."""
    return np.asarray(x).astype(np.float64, copy=False)


def _as_int_codes(codes, what: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.dtype.kind not in "iu" and codes.dtype not in _ML_INT_DTYPES:
        raise FormatError(f"{what} codes must be an integer array, got dtype {codes.dtype}")
    return codes.astype(np.int64)


_ML_INT_DTYPES = {np.dtype(t) for t in (ml_dtypes.int2, ml_dtypes.uint2, ml_dtypes.int4, ml_dtypes.uint4)}


# --- integer formats -----------------------------------------------------------------------------

_INT_ONNX = {
    (2, True): ir.DataType.INT2,
    (2, False): ir.DataType.UINT2,
    (4, True): ir.DataType.INT4,
    (4, False): ir.DataType.UINT4,
    (8, True): ir.DataType.INT8,
    (8, False): ir.DataType.UINT8,
}


@dataclass(frozen=True)
class IntFormat:
    """A `bits`-bit two's-complement (signed) or unsigned integer, 2 <= bits <= 8.

    `numpy_dtype` is the storage container (the smallest of int2/int4/int8 or uint2/uint4/uint8
    that holds the range); `onnx_type` is None for widths ONNX has no type for (3, 5, 6, 7)."""

    bits: int
    signed: bool

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 8:
            raise FormatError(f"integer formats have 2 to 8 bits, got {self.bits!r}")
        if not isinstance(self.signed, bool):
            raise FormatError(f"IntFormat.signed must be a bool, got {self.signed!r}")

    @property
    def name(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def max_finite(self) -> float:
        return float(self.qmax)

    @property
    def has_zero(self) -> bool:
        return True

    @property
    def onnx_type(self) -> ir.DataType | None:
        return _INT_ONNX.get((self.bits, self.signed))

    @property
    def dtype_name(self) -> str | None:
        """The name numpy / ml_dtypes give this format's own dtype ("int4", "uint8"; TVM uses the
        same names), or None for widths that are only stored in a wider container (3, 5, 6, 7)."""
        return np.dtype(self.numpy_dtype).name if self.onnx_type is not None else None

    @property
    def numpy_dtype(self) -> type:
        if self.bits <= 2:
            return ml_dtypes.int2 if self.signed else ml_dtypes.uint2
        if self.bits <= 4:
            return ml_dtypes.int4 if self.signed else ml_dtypes.uint4
        return np.int8 if self.signed else np.uint8

    def quantize(self, x) -> np.ndarray:
        """`clip(rint(x), qmin, qmax)` as float32 (rint: ties to even; ±inf saturate)."""
        x = _as_float(x)
        if np.isnan(x).any():
            raise FormatError(f"{self.name} cannot represent NaN (input holds {int(np.isnan(x).sum())} NaN)")
        return np.clip(np.rint(x), self.qmin, self.qmax).astype(np.float32)

    def encode(self, x) -> np.ndarray:
        """`quantize(x)` as integers in `numpy_dtype`."""
        return self.quantize(x).astype(self.numpy_dtype)

    def decode(self, codes) -> np.ndarray:
        codes = _as_int_codes(codes, self.name)
        if codes.size and (codes.min() < self.qmin or codes.max() > self.qmax):
            raise FormatError(f"{self.name} codes must lie in [{self.qmin}, {self.qmax}], "
                              f"got [{codes.min()}, {codes.max()}]")
        return codes.astype(np.float32)

    def to_storage(self, x) -> np.ndarray:
        return self.encode(x)

    def __str__(self) -> str:
        return self.name


# --- minifloat formats ---------------------------------------------------------------------------

NanEncoding = Literal["ieee", "all_ones", "none", "neg_zero", "max_code"]
_NAN_ENCODINGS = ("ieee", "all_ones", "none", "neg_zero", "max_code")


@dataclass(frozen=True, kw_only=True)
class FloatFormat:
    """A minifloat of `bits = signed + exp_bits + man_bits <= 8`.

    value = (-1)^s * 2^(e - bias) * (1 + m / 2^man_bits) for exponent code e > 0, and
    (-1)^s * 2^(1 - bias) * (m / 2^man_bits) for e == 0 when `subnormals` (else e == 0 is normal
    too and there is no zero: E8M0). `nan` says which codes are NaN:
    "ieee" exponent all ones with mantissa != 0 (mantissa 0 is inf; needs has_inf),
    "all_ones" only S.1..1.1..1 (E4M3FN), "none" no NaN (FP4, FP6, ExMy),
    "neg_zero" the code 1000...0 (fnuz: no -0), "max_code" the code 11...1 (E8M0).
    `max_finite` is stated and checked against the encoding."""

    exp_bits: int
    man_bits: int
    bias: int
    has_inf: bool
    nan: NanEncoding
    max_finite: float
    signed: bool = True
    subnormals: bool = True
    name: str

    def __post_init__(self) -> None:
        for f in ("exp_bits", "man_bits", "bias"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool):
                raise FormatError(f"{self.name}: {f} must be an int, got {v!r}")
        if self.exp_bits < 1 or self.man_bits < 0 or self.bits > 8:
            raise FormatError(f"{self.name}: need exp_bits >= 1, man_bits >= 0 and at most 8 bits, "
                              f"got E{self.exp_bits}M{self.man_bits} ({self.bits} bits)")
        if self.nan not in _NAN_ENCODINGS:
            raise FormatError(f"{self.name}: nan must be one of {', '.join(_NAN_ENCODINGS)}, got {self.nan!r}")
        if self.has_inf != (self.nan == "ieee"):
            raise FormatError(f"{self.name}: an inf exists exactly in the 'ieee' NaN encoding "
                              f"(has_inf={self.has_inf}, nan={self.nan!r})")
        if self.nan == "ieee" and self.man_bits == 0:
            raise FormatError(f"{self.name}: 'ieee' NaNs need at least one mantissa bit")
        if self.nan == "neg_zero" and not self.signed:
            raise FormatError(f"{self.name}: 'neg_zero' NaN needs a sign bit")
        if not self.subnormals and self.signed:
            raise FormatError(f"{self.name}: formats without zero (subnormals=False) must be unsigned")
        finite = self._table[np.isfinite(self._table)]
        if not np.isfinite(self.max_finite) or finite.max() != self.max_finite:
            raise FormatError(f"{self.name}: stated max_finite {self.max_finite!r} is not the largest "
                              f"finite value of the encoding ({finite.max()!r})")

    # -- stated/derived properties --

    @property
    def bits(self) -> int:
        return int(self.signed) + self.exp_bits + self.man_bits

    @property
    def has_nan(self) -> bool:
        return self.nan != "none"

    @property
    def has_zero(self) -> bool:
        return self.subnormals

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value (E8M0: 2^-127)."""
        return float(2.0 ** (1 - self.bias if self.subnormals else -self.bias))

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (equals `min_normal` when there are no subnormals)."""
        if not self.subnormals or self.man_bits == 0:
            return self.min_normal
        return float(2.0 ** (1 - self.bias - self.man_bits))

    @property
    def onnx_type(self) -> ir.DataType | None:
        return _FLOAT_ONNX.get(self.name)

    @property
    def numpy_dtype(self) -> type | None:
        """The ml_dtypes type with the same encoding, or None (ExMy family)."""
        return _FLOAT_NUMPY.get(self.name)

    @property
    def dtype_name(self) -> str | None:
        """The name of `numpy_dtype` ("float8_e4m3fn"; TVM names its dtypes the same), or None."""
        return None if self.numpy_dtype is None else np.dtype(self.numpy_dtype).name

    @property
    def max_code(self) -> int:
        """The code of +max_finite (sign bit clear): E4M3FN 0x7E, E5M2 0x7B."""
        return int(np.argmax(self._table == self.max_finite))

    @property
    def inf_code(self) -> int | None:
        """The code of +inf (E5M2: 0x7C), or None for formats without an inf."""
        return (((1 << self.exp_bits) - 1) << self.man_bits) if self.has_inf else None

    @property
    def nan_code(self) -> int | None:
        """The code `encode` writes for +NaN (E4M3FN 0x7F, E5M2 0x7E; fnuz 0x80), or None for
        formats without a NaN."""
        return int(self._nan_code(np.zeros((), bool))) if self.has_nan else None

    def __str__(self) -> str:
        return self.name

    # -- tables built once from the encoding --

    @cached_property
    def _table(self) -> np.ndarray:
        """float64 value of every code 0 .. 2^bits - 1 (NaN and ±inf where the encoding says)."""
        codes = np.arange(1 << self.bits, dtype=np.int64)
        mag_bits = self.exp_bits + self.man_bits
        mag = codes & ((1 << mag_bits) - 1)
        negative = (codes >> mag_bits).astype(bool) if self.signed else np.zeros(codes.shape, bool)
        e = mag >> self.man_bits
        m = mag & ((1 << self.man_bits) - 1)
        normal = np.ldexp((1 << self.man_bits) + m, e - self.bias - self.man_bits).astype(np.float64)
        if self.subnormals:
            sub = np.ldexp(m.astype(np.float64), 1 - self.bias - self.man_bits)
            value = np.where(e == 0, sub, normal)
        else:
            value = normal
        value = np.where(negative, -value, value)
        e_ones = (1 << self.exp_bits) - 1
        if self.nan == "ieee":
            value = np.where((e == e_ones) & (m == 0), np.where(negative, -np.inf, np.inf), value)
            value = np.where((e == e_ones) & (m != 0), np.nan, value)
        elif self.nan == "all_ones":
            value = np.where(mag == (1 << mag_bits) - 1, np.nan, value)
        elif self.nan == "neg_zero":
            value = np.where(codes == 1 << mag_bits, np.nan, value)
        elif self.nan == "max_code":
            value = np.where(codes == (1 << self.bits) - 1, np.nan, value)
        return np.where(np.isnan(value) & negative, -np.abs(value), value)  # NaNs keep the sign bit

    @cached_property
    def _positive(self) -> np.ndarray:
        """Values of the non-negative finite codes 0, 1, ..., in code order (strictly increasing)."""
        n_mag = 1 << (self.exp_bits + self.man_bits)
        head = self._table[:n_mag]
        count = int(np.argmax(head == self.max_finite)) + 1
        return head[:count]

    def _nan_code(self, negative: np.ndarray) -> np.ndarray:
        sign = negative.astype(np.int64) << (self.bits - 1) if self.signed else 0
        mag_bits = self.exp_bits + self.man_bits
        if self.nan == "ieee":
            return sign | (((1 << self.exp_bits) - 1) << self.man_bits) | (1 << (self.man_bits - 1))
        if self.nan == "all_ones":
            return sign | ((1 << mag_bits) - 1)
        if self.nan == "neg_zero":
            return np.full(negative.shape, 1 << mag_bits)
        return np.full(negative.shape, (1 << self.bits) - 1)  # max_code

    # -- numerics --

    def quantize(self, x) -> np.ndarray:
        """Round `x` to the nearest value of the format (ties to even), saturating at ±max_finite."""
        x = _as_float(x)
        a = np.abs(x)
        emin = 1 - self.bias if self.subnormals else -self.bias
        with np.errstate(invalid="ignore", over="ignore"):
            _, ex = np.frexp(a)  # a = f * 2^ex, f in [0.5, 1): floor(log2 a) = ex - 1
            e = np.maximum(ex - 1, emin)
            q = np.ldexp(np.rint(np.ldexp(a, self.man_bits - e)), e - self.man_bits)
            q = np.minimum(q, self.max_finite)  # saturation, inf included
            if not self.has_zero:
                q = np.maximum(q, self.min_subnormal)
            if self.signed:
                q = np.where(np.signbit(x), -q, q)
                if self.nan == "neg_zero":
                    q = q + 0.0  # -0 is not representable: -0.0 + 0.0 == +0.0
            else:
                q = np.where(x < 0, np.nan, q)
            q = np.where(np.isnan(x), x if self.has_nan else 0.0, q)
        return q.astype(np.float32)

    def encode(self, x) -> np.ndarray:
        """uint8 codes (sign | exponent | mantissa) of `quantize(x)`."""
        q = self.quantize(x).astype(np.float64)
        a = np.abs(q)
        isnan = np.isnan(q)
        idx = np.searchsorted(self._positive, np.where(isnan, 0.0, a))
        codes = idx.astype(np.int64)
        if self.signed:
            codes = codes | (np.signbit(q).astype(np.int64) << (self.bits - 1))
        if self.has_nan:
            codes = np.where(isnan, self._nan_code(np.signbit(q)), codes)
        return codes.astype(np.uint8)

    def decode(self, codes) -> np.ndarray:
        """float32 values of uint8 codes (NaN codes give NaN, E5M2's inf codes ±inf)."""
        codes = _as_int_codes(codes, self.name)
        if codes.size and (codes.min() < 0 or codes.max() >= 1 << self.bits):
            raise FormatError(f"{self.name} codes must lie in [0, {(1 << self.bits) - 1}], "
                              f"got [{codes.min()}, {codes.max()}]")
        return self._table[codes].astype(np.float32)

    def to_storage(self, x) -> np.ndarray:
        """`quantize(x)` as the ml_dtypes array (exact: every quantized value is representable)."""
        if self.numpy_dtype is None:
            raise FormatError(f"{self.name} has no numpy/ml_dtypes storage type; use encode() for uint8 codes")
        return self.quantize(x).astype(self.numpy_dtype)


Format = Union[IntFormat, FloatFormat]

# --- the formats --------------------------------------------------------------------------------

INT2 = IntFormat(2, True)
UINT2 = IntFormat(2, False)
INT4 = IntFormat(4, True)
UINT4 = IntFormat(4, False)
INT8 = IntFormat(8, True)
UINT8 = IntFormat(8, False)

# "FP8 Formats for Deep Learning" (Micikevicius et al. 2022): E4M3 has no inf, one NaN per sign.
FP8_E4M3 = FloatFormat(name="fp8_e4m3", exp_bits=4, man_bits=3, bias=7, has_inf=False, nan="all_ones",
                       max_finite=448.0)
FP8_E5M2 = FloatFormat(name="fp8_e5m2", exp_bits=5, man_bits=2, bias=15, has_inf=True, nan="ieee",
                       max_finite=57344.0)
FP8_E4M3FNUZ = FloatFormat(name="fp8_e4m3fnuz", exp_bits=4, man_bits=3, bias=8, has_inf=False,
                           nan="neg_zero", max_finite=240.0)
FP8_E5M2FNUZ = FloatFormat(name="fp8_e5m2fnuz", exp_bits=5, man_bits=2, bias=16, has_inf=False,
                           nan="neg_zero", max_finite=57344.0)
# OCP Microscaling (MX) v1.0 element and scale formats.
FP4_E2M1 = FloatFormat(name="fp4_e2m1", exp_bits=2, man_bits=1, bias=1, has_inf=False, nan="none",
                       max_finite=6.0)
FP6_E2M3 = FloatFormat(name="fp6_e2m3", exp_bits=2, man_bits=3, bias=1, has_inf=False, nan="none",
                       max_finite=7.5)
FP6_E3M2 = FloatFormat(name="fp6_e3m2", exp_bits=3, man_bits=2, bias=3, has_inf=False, nan="none",
                       max_finite=28.0)
E8M0 = FloatFormat(name="e8m0", exp_bits=8, man_bits=0, bias=127, has_inf=False, nan="max_code",
                   max_finite=2.0**127, signed=False, subnormals=False)

_FLOAT_ONNX = {
    "fp8_e4m3": ir.DataType.FLOAT8E4M3FN,
    "fp8_e5m2": ir.DataType.FLOAT8E5M2,
    "fp8_e4m3fnuz": ir.DataType.FLOAT8E4M3FNUZ,
    "fp8_e5m2fnuz": ir.DataType.FLOAT8E5M2FNUZ,
    "fp4_e2m1": ir.DataType.FLOAT4E2M1,
    "fp6_e2m3": ir.DataType.FLOAT6E2M3,
    "fp6_e3m2": ir.DataType.FLOAT6E3M2,
    "e8m0": ir.DataType.FLOAT8E8M0,
}
_FLOAT_NUMPY = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "fp8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "e8m0": ml_dtypes.float8_e8m0fnu,
}


def fp8_exmy(e: int, m: int) -> FloatFormat:
    """E`e`M`m` of Kuzmin et al. 2022 (see the module docstring): e + m = 7, 1 <= e <= 6,
    bias 2^(e-1) - 1, subnormals, no inf or NaN, max (2 - 2^-m) * 2^(2^e - 1 - bias)."""
    if not (isinstance(e, int) and isinstance(m, int)) or e + m != 7 or not 1 <= e <= 6:
        raise FormatError(f"the FP8 ExMy family has e + m = 7 and 1 <= e <= 6, got e={e!r}, m={m!r}")
    bias = (1 << (e - 1)) - 1
    top = (1 << e) - 1 - bias
    return FloatFormat(name=f"e{e}m{m}", exp_bits=e, man_bits=m, bias=bias, has_inf=False, nan="none",
                       max_finite=(2.0 - 2.0**-m) * 2.0**top)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        *(IntFormat(b, s) for s in (True, False) for b in range(2, 9)),
        FP8_E4M3, FP8_E5M2, FP8_E4M3FNUZ, FP8_E5M2FNUZ, FP4_E2M1, FP6_E2M3, FP6_E3M2, E8M0,
        *(fp8_exmy(e, 7 - e) for e in range(1, 7)),
    )
}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise FormatError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}") from None


# --- granularity ---------------------------------------------------------------------------------


def _check_int(value, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise FormatError(f"{what} must be an int, got {value!r}")


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""

    def __str__(self) -> str:
        return "tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale per index of `axis` (ONNX DequantizeLinear `axis`). Weights [K, N]: axis=1."""

    axis: int

    def __post_init__(self) -> None:
        _check_int(self.axis, "PerChannel.axis")

    def __str__(self) -> str:
        return f"channel({self.axis})"


@dataclass(frozen=True)
class PerBlock:
    """One scale per `size` consecutive elements along `axis` (ONNX DequantizeLinear `axis` and
    `block_size`). Weights [K, N]: axis=0 blocks input features per output channel."""

    axis: int
    size: int

    def __post_init__(self) -> None:
        _check_int(self.axis, "PerBlock.axis")
        _check_int(self.size, "PerBlock.size")
        if self.size <= 0:
            raise FormatError(f"block size must be positive, got {self.size}")

    def __str__(self) -> str:
        return f"block({self.axis},{self.size})"


@dataclass(frozen=True)
class PerToken:
    """One scale per row of the last axis (reduced over the last axis), found at run time."""

    def __str__(self) -> str:
        return "token"


Granularity = Union[PerTensor, PerChannel, PerBlock, PerToken]
_GRANULARITIES = (PerTensor, PerChannel, PerBlock, PerToken)

# --- QuantSpec -----------------------------------------------------------------------------------

_PERCENTILE = re.compile(r"percentile\s*[(:]\s*([^()\s]+)\s*\)?")
_CHANNEL = re.compile(r"channel\(\s*(-?\d+)\s*\)")
_BLOCK = re.compile(r"block\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)")


def _canonical_method(method) -> str:
    if method in ("minmax", "mse"):
        return method
    m = _PERCENTILE.fullmatch(method) if isinstance(method, str) else None
    if m is None or (method.startswith("percentile(") != method.endswith(")")):
        raise FormatError(f"unknown scale method {method!r}; use minmax, mse or percentile(P) with 0 < P <= 100")
    try:
        p = float(m.group(1))
    except ValueError:
        raise FormatError(f"percentile must be a number, got {m.group(1)!r} in {method!r}") from None
    if not 0.0 < p <= 100.0:
        raise FormatError(f"percentile must lie in (0, 100], got {p!r} in {method!r}")
    text = repr(p)
    return f"percentile({text[:-2] if text.endswith('.0') else text})"


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: format, granularity, symmetry, scale method, scale format,
    static or dynamic scales. `scale_method` is "minmax", "mse" or "percentile(P)" (also accepted
    as "percentile:P" and stored in the first spelling). `scale_format` None means float32 scales;
    a FloatFormat (E8M0 for MX, fp8_e4m3 for NVFP4) means scales are rounded to it. `dynamic`
    scales are computed at run time from the min/max of the data."""

    format: Format
    granularity: Granularity = field(default_factory=PerTensor)
    symmetric: bool = True
    scale_method: str = "minmax"
    scale_format: FloatFormat | None = None
    dynamic: bool = False

    def __post_init__(self) -> None:
        fmt = self.format
        if not isinstance(fmt, (IntFormat, FloatFormat)):
            raise FormatError(f"QuantSpec.format must be an IntFormat or FloatFormat, got {fmt!r}")
        if not fmt.has_zero:
            raise FormatError(f"{fmt.name} has no zero and is a scale format only; use it as scale_format")
        if not isinstance(self.granularity, _GRANULARITIES):
            raise FormatError(f"unknown granularity {self.granularity!r}")
        if not isinstance(self.symmetric, bool) or not isinstance(self.dynamic, bool):
            raise FormatError(f"symmetric and dynamic must be bools, got {self.symmetric!r}, {self.dynamic!r}")
        if not self.symmetric and isinstance(fmt, FloatFormat):
            raise FormatError(f"asymmetric quantization needs an integer format, not {fmt.name}")
        object.__setattr__(self, "scale_method", _canonical_method(self.scale_method))
        if self.scale_format is not None and not isinstance(self.scale_format, FloatFormat):
            raise FormatError(f"scale_format must be None (float32) or a float format, got {self.scale_format!r}")
        if isinstance(self.granularity, PerToken) and not self.dynamic:
            raise FormatError("per-token scales are computed at run time: 'token' needs 'dynamic'")
        if self.dynamic and self.scale_method != "minmax":
            raise FormatError(f"dynamic scales are computed from min/max at run time, not {self.scale_method}")

    @property
    def percentile(self) -> float | None:
        """P of a "percentile(P)" scale method, else None."""
        if self.scale_method.startswith("percentile("):
            return float(self.scale_method[len("percentile("):-1])
        return None

    def __str__(self) -> str:
        parts = [self.format.name, str(self.granularity), "sym" if self.symmetric else "asym"]
        if self.scale_method != "minmax":
            parts.append(self.scale_method)
        if self.scale_format is not None:
            parts.append(f"scale={self.scale_format.name}")
        if self.dynamic:
            parts.append("dynamic")
        return ":".join(parts)

    @classmethod
    def parse(cls, text: str) -> QuantSpec:
        """Inverse of `str` (grammar in the module docstring); FormatError names what failed."""
        if not isinstance(text, str) or not text.strip():
            raise FormatError(f"empty or non-string quantization spec {text!r}")
        head, *rest = [p.strip() for p in text.strip().split(":")]
        kwargs: dict = {}
        last = -1
        for part in rest:
            kind, key, value = _parse_field(part, text)
            if kind <= last:
                raise FormatError(f"{part!r} is repeated or out of order in {text!r}; "
                                  "order: format:granularity:sym|asym[:method][:scale=FMT][:dynamic]")
            last = kind
            kwargs[key] = value
        try:
            fmt = get_format(head)
        except FormatError as e:
            raise FormatError(f"in {text!r}: {e}") from None
        return cls(fmt, **kwargs)


def _parse_field(part: str, text: str) -> tuple[int, str, object]:
    """(position in the grammar, QuantSpec field, value) of one ':'-separated field."""
    if part == "tensor":
        return 0, "granularity", PerTensor()
    if part == "token":
        return 0, "granularity", PerToken()
    if m := _CHANNEL.fullmatch(part):
        return 0, "granularity", PerChannel(int(m.group(1)))
    if m := _BLOCK.fullmatch(part):
        return 0, "granularity", PerBlock(int(m.group(1)), int(m.group(2)))
    if part in ("sym", "asym"):
        return 1, "symmetric", part == "sym"
    if part in ("minmax", "mse") or part.startswith("percentile"):
        return 2, "scale_method", _canonical_method(part)
    if part.startswith("scale="):
        name = part[len("scale="):].strip()
        try:
            return 3, "scale_format", get_format(name)
        except FormatError as e:
            raise FormatError(f"in {text!r}: {e}") from None
    if part == "dynamic":
        return 4, "dynamic", True
    raise FormatError(f"cannot parse {part!r} in quantization spec {text!r}; "
                      "expected format:granularity:sym|asym[:minmax|mse|percentile(P)][:scale=FMT][:dynamic]")


# --- scales --------------------------------------------------------------------------------------

MIN_SCALE = 2.0**-24  # the floor of computed activation scales (per-token ones included, at run time)


def symmetric_scale(absmax, fmt: Format) -> np.ndarray:
    """float32 `absmax / fmt.max_finite`; where that is 0 (all-zero group, or underflow) the scale is
    1.0: every element of such a group quantizes to 0, and 1.0 is exact in every scale dtype
    (fp16, bf16, E8M0, E4M3), so rounding the scale later never makes it 0 or inf."""
    a = _as_float(absmax)
    if not np.isfinite(a).all() or (a < 0).any():
        raise FormatError("absmax must be finite and non-negative")
    s = (a / fmt.max_finite).astype(np.float32)
    return np.where(s > 0, s, np.float32(1.0)).astype(np.float32)


def asymmetric_scale_zero_point(lo, hi, fmt: IntFormat) -> tuple[np.ndarray, np.ndarray]:
    """(float32 scale, zero point in `fmt.numpy_dtype`) mapping [min(lo, 0), max(hi, 0)] onto
    [qmin, qmax], zero exactly representable: zp = clip(rint(qmin - lo / scale), qmin, qmax).
    A zero-width range gets scale 1.0 (see `symmetric_scale`)."""
    if not isinstance(fmt, IntFormat):
        raise FormatError(f"asymmetric quantization needs an integer format, not {fmt.name}")
    lo, hi = _as_float(lo), _as_float(hi)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise FormatError("min and max must be finite")
    if (lo > hi).any():
        raise FormatError("min must not exceed max")
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    s = ((hi - lo) / (fmt.qmax - fmt.qmin)).astype(np.float32)
    s = np.where(s > 0, s, np.float32(1.0)).astype(np.float32)
    zp = np.clip(np.rint(fmt.qmin - lo / s.astype(np.float64)), fmt.qmin, fmt.qmax)
    return s, zp.astype(fmt.numpy_dtype)
