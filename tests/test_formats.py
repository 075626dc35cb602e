"""lpcompile.formats: bit-exact numerics against ml_dtypes (and a brute-force enumeration for the
ExMy family, which ml_dtypes does not have), QuantSpec printing/parsing, and every validation."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lpcompile.errors import FormatError
from lpcompile.formats import (
    E8M0,
    FORMATS,
    FP4_E2M1,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E4M3,
    FP8_E4M3FNUZ,
    FP8_E5M2,
    FP8_E5M2FNUZ,
    INT2,
    INT4,
    INT8,
    UINT2,
    UINT4,
    UINT8,
    FloatFormat,
    IntFormat,
    PerBlock,
    PerChannel,
    PerTensor,
    PerToken,
    QuantSpec,
    asymmetric_scale_zero_point,
    fp8_exmy,
    get_format,
    symmetric_scale,
)

ML = [
    (FP8_E4M3, ml_dtypes.float8_e4m3fn),
    (FP8_E5M2, ml_dtypes.float8_e5m2),
    (FP8_E4M3FNUZ, ml_dtypes.float8_e4m3fnuz),
    (FP8_E5M2FNUZ, ml_dtypes.float8_e5m2fnuz),
    (FP4_E2M1, ml_dtypes.float4_e2m1fn),
    (FP6_E2M3, ml_dtypes.float6_e2m3fn),
    (FP6_E3M2, ml_dtypes.float6_e3m2fn),
    (E8M0, ml_dtypes.float8_e8m0fnu),
]
ML_IDS = [f.name for f, _ in ML]
EXMY = [fp8_exmy(e, 7 - e) for e in range(1, 7)]


def ml_table(dtype, bits: int) -> np.ndarray:
    """float32 value of every code, via ml_dtypes (sub-byte types hold one code per byte)."""
    values = np.arange(1 << bits, dtype=np.uint8).view(dtype).astype(np.float32)
    finite = np.isfinite(values)
    # guard the view: casting the values back must give the same codes
    back = values[finite].astype(dtype).view(np.uint8)
    assert np.array_equal(back, np.arange(1 << bits)[finite]), "ml_dtypes view of codes is not as assumed"
    return values


def finite_values(fmt: FloatFormat) -> np.ndarray:
    """Sorted unique finite values of a format (from its decode table)."""
    d = fmt.decode(np.arange(1 << fmt.bits)).astype(np.float64)
    return np.unique(d[np.isfinite(d)])


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal values, NaN positions and signs of zero."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=True) and np.array_equal(np.signbit(a), np.signbit(b))


# --- float formats with an ml_dtypes twin -------------------------------------------------------


@pytest.mark.parametrize(("fmt", "dtype"), ML, ids=ML_IDS)
def test_decode_every_code_matches_ml_dtypes(fmt, dtype):
    codes = np.arange(1 << fmt.bits, dtype=np.uint8)
    ref = ml_table(dtype, fmt.bits)
    assert same(fmt.decode(codes), ref)  # NaN codes and their sign bits too
    assert fmt.decode(codes).dtype == np.float32


@pytest.mark.parametrize(("fmt", "dtype"), ML, ids=ML_IDS)
def test_stated_limits_match_ml_dtypes(fmt, dtype):
    fi = ml_dtypes.finfo(dtype)
    assert fmt.max_finite == float(fi.max)
    assert fmt.min_normal == float(fi.smallest_normal)
    assert fmt.min_subnormal == float(fi.smallest_subnormal)
    assert fmt.numpy_dtype is dtype
    assert fmt.bits == fi.bits


def test_stated_limits_by_name():
    assert (FP8_E4M3.max_finite, FP8_E5M2.max_finite, FP4_E2M1.max_finite) == (448.0, 57344.0, 6.0)
    assert (E8M0.max_finite, E8M0.min_normal, E8M0.signed, E8M0.has_zero) == (2.0**127, 2.0**-127, False, False)
    assert (FP6_E2M3.max_finite, FP6_E3M2.max_finite) == (7.5, 28.0)
    assert not FP8_E4M3.has_inf and FP8_E5M2.has_inf and not FP4_E2M1.has_nan


def test_onnx_types():
    assert FP8_E4M3.onnx_type == ir.DataType.FLOAT8E4M3FN
    assert FP8_E5M2.onnx_type == ir.DataType.FLOAT8E5M2
    assert FP8_E4M3FNUZ.onnx_type == ir.DataType.FLOAT8E4M3FNUZ
    assert FP4_E2M1.onnx_type == ir.DataType.FLOAT4E2M1
    assert FP6_E2M3.onnx_type == ir.DataType.FLOAT6E2M3
    assert E8M0.onnx_type == ir.DataType.FLOAT8E8M0
    assert [f.onnx_type for f in (INT2, UINT2, INT4, UINT4, INT8, UINT8)] == [
        ir.DataType.INT2, ir.DataType.UINT2, ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.INT8, ir.DataType.UINT8]
    assert get_format("int3").onnx_type is None
    assert all(f.onnx_type is None and f.numpy_dtype is None for f in EXMY)


@pytest.mark.parametrize(("fmt", "dtype"), ML, ids=ML_IDS)
def test_every_representable_value_is_a_fixed_point_and_encodes_to_its_code(fmt, dtype):
    codes = np.arange(1 << fmt.bits)
    values = fmt.decode(codes)
    finite = np.isfinite(values)
    assert same(fmt.quantize(values[finite]), values[finite])
    assert np.array_equal(fmt.encode(values[finite]), codes[finite].astype(np.uint8))
    assert same(fmt.decode(fmt.encode(values[finite])), values[finite])


@pytest.mark.parametrize(("fmt", "dtype"), ML, ids=ML_IDS)
def test_ties_round_like_ml_dtypes(fmt, dtype):
    v = finite_values(fmt)
    v = v[v >= 0] if fmt.signed else v
    mid = (v[:-1] + v[1:]) / 2
    assert np.array_equal(mid.astype(np.float32).astype(np.float64), mid)  # ties are exact in float32
    x = mid.astype(np.float32)
    if fmt.signed:
        x = np.concatenate([x, -x])
    assert same(fmt.quantize(x), x.astype(dtype).astype(np.float32))
    assert np.array_equal(fmt.encode(x), x.astype(dtype).view(np.uint8))
    lo_hi = fmt.encode(mid.astype(np.float32))
    if fmt.man_bits > 0:
        assert (lo_hi % 2 == 0).all()  # to the even code
    else:
        assert np.array_equal(fmt.quantize(mid), v[1:].astype(np.float32))  # E8M0: ties go up
    # one ulp (float32) either side of a tie goes to the nearer neighbour
    below = np.nextafter(mid.astype(np.float32), np.float32(-np.inf))
    above = np.nextafter(mid.astype(np.float32), np.float32(np.inf))
    assert np.array_equal(fmt.quantize(below), v[:-1].astype(np.float32))
    assert np.array_equal(fmt.quantize(above), v[1:].astype(np.float32))


def _random_in_range(fmt: FloatFormat, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lo, hi = math.log2(fmt.min_subnormal) - 2, math.log2(fmt.max_finite)
    mag = np.exp2(rng.uniform(lo, hi, n))                                  # log-uniform: every binade
    sub = rng.uniform(0, fmt.min_normal, n // 4)                           # dense in the subnormals
    x = np.concatenate([mag, sub]).astype(np.float32)
    if fmt.signed:
        x = x * rng.choice(np.array([-1, 1], np.float32), x.size)
    return x[(np.abs(x) <= fmt.max_finite) & (x != 0)]


@pytest.mark.parametrize(("fmt", "dtype"), ML, ids=ML_IDS)
def test_random_values_match_ml_dtypes(fmt, dtype):
    x = _random_in_range(fmt, 20000, seed=fmt.bits + fmt.bias)
    assert x.size > 10000
    if fmt is E8M0:  # see test_e8m0_float32_subnormal_inputs_round_to_nearest
        x = x[(x <= 2.0**-127) | (x >= 2.0**-126)]
    ref = x.astype(dtype)
    assert same(fmt.quantize(x), ref.astype(np.float32))
    assert np.array_equal(fmt.encode(x), ref.view(np.uint8))
    storage = fmt.to_storage(x)
    assert storage.dtype == np.dtype(dtype)
    assert np.array_equal(storage.view(np.uint8), ref.view(np.uint8))
    # float64 input below float32 precision is rounded once, directly
    assert same(fmt.quantize(x.astype(np.float64)), ref.astype(np.float32))


@pytest.mark.parametrize(("fmt", "dtype"), ML, ids=ML_IDS)
def test_overflow_saturates_to_max_finite(fmt, dtype):
    m = fmt.max_finite
    step = m - finite_values(fmt)[-2]
    x = np.array([m + step * 0.5, m + step * 0.51, m * 1.5, m * 1000, np.inf], np.float64)
    x = x[(x <= np.finfo(np.float32).max) | np.isinf(x)]
    assert np.array_equal(fmt.quantize(x), np.full(x.shape, m, np.float32))
    assert (fmt.encode(x) == fmt.encode(np.array([m]))[0]).all()
    assert np.array_equal(fmt.to_storage(x).astype(np.float32), np.full(x.shape, m, np.float32))
    if fmt.signed:
        assert np.array_equal(fmt.quantize(-x), np.full(x.shape, -m, np.float32))


@pytest.mark.parametrize(("fmt", "dtype"), [p for p in ML if p[0].has_nan], ids=[f.name for f, _ in ML if f.has_nan])
def test_nan_stays_nan_with_the_ml_dtypes_code(fmt, dtype):
    x = np.array([np.nan, -np.nan], np.float32)
    assert np.isnan(fmt.quantize(x)).all()
    assert np.array_equal(fmt.encode(x), x.astype(dtype).view(np.uint8))
    assert np.isnan(fmt.decode(fmt.encode(x))).all()


@pytest.mark.parametrize("fmt", [FP4_E2M1, FP6_E2M3, FP6_E3M2], ids=lambda f: f.name)
def test_nan_becomes_positive_zero_without_a_nan_code(fmt):
    x = np.array([np.nan, -np.nan], np.float32)
    assert same(fmt.quantize(x), np.zeros(2, np.float32))
    assert np.array_equal(fmt.encode(x), np.zeros(2, np.uint8))
    # ml_dtypes (and ONNX's reference QuantizeLinear) also give a zero, with an inverted sign bit
    assert np.array_equal(x.astype(fmt.numpy_dtype).astype(np.float32), np.zeros(2, np.float32))


def test_e5m2_inf_saturates_but_decodes():
    assert np.array_equal(FP8_E5M2.quantize(np.array([np.inf, -np.inf])), np.array([57344, -57344], np.float32))
    assert np.array_equal(FP8_E5M2.decode(np.array([0x7C, 0xFC])), np.array([np.inf, -np.inf], np.float32))


@pytest.mark.parametrize("fmt", [FP8_E4M3FNUZ, FP8_E5M2FNUZ], ids=lambda f: f.name)
def test_fnuz_has_no_negative_zero(fmt):
    x = np.array([-0.0, -fmt.min_subnormal / 4], np.float32)
    assert same(fmt.quantize(x), np.zeros(2, np.float32))
    assert np.array_equal(fmt.encode(x), np.zeros(2, np.uint8))
    assert np.array_equal(x.astype(fmt.numpy_dtype).view(np.uint8), np.zeros(2, np.uint8))


def test_negative_zero_kept_where_representable():
    assert same(FP8_E4M3.quantize(np.array([-0.0, -1e-9])), np.array([-0.0, -0.0], np.float32))
    assert np.array_equal(FP8_E4M3.encode(np.array([-0.0])), np.array([0x80], np.uint8))


def test_e8m0_rounding_and_specials():
    q = E8M0.quantize
    assert np.array_equal(q(np.array([1.5, 3.0, 0.75, 2.5, 1.4999])), np.array([2, 4, 1, 2, 1], np.float32))
    assert np.array_equal(q(np.array([0.0, -0.0, 2.0**-140, 2.0**-127])), np.full(4, 2.0**-127, np.float32))
    assert np.array_equal(q(np.array([np.inf, 2.0**127 * 1.9])), np.full(2, 2.0**127, np.float32))
    assert np.isnan(q(np.array([-1.0, -np.inf, np.nan]))).all()
    assert np.array_equal(E8M0.encode(np.array([1.0, 2.0**-127, 2.0**127, -1.0])), np.array([127, 0, 254, 255], np.uint8))


def test_e8m0_float32_subnormal_inputs_round_to_nearest():
    # float32 subnormals in (2^-127, 1.5 * 2^-127) are nearest to 2^-127. ml_dtypes (like ONNX's
    # to_float8e8m0) rounds the raw float32 bits and sends them to 2^-126; we round the value.
    x = np.array([1.03 * 2.0**-127, 1.49 * 2.0**-127, 1.5 * 2.0**-127, 1.9 * 2.0**-127], np.float32)
    assert np.array_equal(E8M0.quantize(x), np.array([2.0**-127, 2.0**-127, 2.0**-126, 2.0**-126], np.float32))
    assert x[:1].astype(ml_dtypes.float8_e8m0fnu).astype(np.float32)[0] == np.float32(2.0**-126)


# --- the ExMy family (Kuzmin et al. 2022), against a brute-force enumeration -------------------


def brute_force_exmy(e: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, codes) of every code, written out from the paper's definition one code at a time."""
    bias = 2 ** (e - 1) - 1
    values, codes = [], []
    for code in range(256):
        sign, exp, man = code >> 7, (code >> m) & (2**e - 1), code & (2**m - 1)
        if exp == 0:
            mag = (man / 2**m) * 2.0 ** (1 - bias)
        else:
            mag = (1 + man / 2**m) * 2.0 ** (exp - bias)
        values.append(-mag if sign else mag)
        codes.append(code)
    return np.array(values), np.array(codes)


def brute_force_round(x: np.ndarray, e: int, m: int) -> np.ndarray:
    """Nearest value by exhaustive distance; ties to the even code."""
    values, codes = brute_force_exmy(e, m)
    dist = np.abs(x[:, None].astype(np.float64) - values[None, :])
    best = dist == dist.min(axis=1, keepdims=True)
    cand = np.where(best, codes[None, :] % 2 == 0, False)
    pick = np.where(cand.any(axis=1), np.argmax(cand, axis=1), np.argmax(best, axis=1))
    return values[pick].astype(np.float32)


@pytest.mark.parametrize("fmt", EXMY, ids=lambda f: f.name)
def test_exmy_decode_matches_brute_force(fmt):
    e, m = fmt.exp_bits, fmt.man_bits
    values, codes = brute_force_exmy(e, m)
    assert np.array_equal(fmt.decode(codes), values.astype(np.float32))
    assert fmt.max_finite == values.max() and not fmt.has_nan and not fmt.has_inf
    assert fmt.name == f"e{e}m{m}" and get_format(fmt.name) == fmt


def test_exmy_stated_maxima():
    assert [get_format(n).max_finite for n in ("e2m5", "e3m4", "e4m3", "e5m2")] == [7.875, 31.0, 480.0, 114688.0]
    assert fp8_exmy(4, 3) != FP8_E4M3 and fp8_exmy(5, 2) != FP8_E5M2


@pytest.mark.parametrize("fmt", EXMY, ids=lambda f: f.name)
def test_exmy_rounding_matches_brute_force(fmt):
    e, m = fmt.exp_bits, fmt.man_bits
    v = finite_values(fmt)
    mids = ((v[:-1] + v[1:]) / 2).astype(np.float32)
    x = np.concatenate([
        _random_in_range(fmt, 3000, seed=e),
        mids,                                              # every tie, both signs
        np.array([fmt.max_finite * 1.01, fmt.max_finite * 50, -fmt.max_finite * 3], np.float32),
    ])
    assert np.array_equal(fmt.quantize(x), brute_force_round(x, e, m))
    assert np.array_equal(fmt.decode(fmt.encode(x)), brute_force_round(x, e, m))


@pytest.mark.parametrize(("name", "dtype"), [("e3m4", ml_dtypes.float8_e3m4), ("e4m3", ml_dtypes.float8_e4m3)])
def test_exmy_agrees_with_ieee_like_ml_dtypes_below_their_max(name, dtype):
    fmt = get_format(name)
    top = float(ml_dtypes.finfo(dtype).max)  # 15.5 / 240: ml_dtypes reserves exponent all-ones for inf/NaN
    assert top < fmt.max_finite
    x = _random_in_range(fmt, 5000, seed=1)
    x = x[np.abs(x) <= top]
    assert np.array_equal(fmt.quantize(x), x.astype(dtype).astype(np.float32))


def test_exmy_nan_inf_and_storage():
    e3m4 = get_format("e3m4")
    assert np.array_equal(e3m4.quantize(np.array([np.nan, np.inf, -np.inf])), np.array([0, 31, -31], np.float32))
    with pytest.raises(FormatError, match="no numpy"):
        e3m4.to_storage(np.ones(3))


@pytest.mark.parametrize(("e", "m"), [(4, 4), (0, 7), (7, 0), (3, 3)])
def test_exmy_refuses_other_widths(e, m):
    with pytest.raises(FormatError, match="ExMy"):
        fp8_exmy(e, m)


# --- integer formats ----------------------------------------------------------------------------

INTS = [f for f in FORMATS.values() if isinstance(f, IntFormat)]


@pytest.mark.parametrize("fmt", INTS, ids=lambda f: f.name)
def test_int_codes_round_trip(fmt):
    values = np.arange(fmt.qmin, fmt.qmax + 1)
    assert len(values) == 2**fmt.bits and fmt.max_finite == float(fmt.qmax)
    assert np.array_equal(fmt.quantize(values), values.astype(np.float32))
    codes = fmt.encode(values.astype(np.float32))
    assert codes.dtype == np.dtype(fmt.numpy_dtype)
    assert np.array_equal(codes.astype(np.int64), values)
    assert np.array_equal(fmt.decode(codes), values.astype(np.float32))


def test_int_names_and_ranges():
    assert [(f.name, f.qmin, f.qmax) for f in (INT2, UINT2, INT4, UINT4, INT8, UINT8)] == [
        ("int2", -2, 1), ("uint2", 0, 3), ("int4", -8, 7), ("uint4", 0, 15), ("int8", -128, 127), ("uint8", 0, 255)]
    assert get_format("int3").numpy_dtype is ml_dtypes.int4 and get_format("uint6").numpy_dtype is np.uint8


def test_int_ties_round_half_to_even():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5])
    assert np.array_equal(INT8.quantize(x), np.rint(x).astype(np.float32))
    assert np.array_equal(INT8.quantize(x), np.array([0, 2, 2, 0, -2, -2, 4], np.float32))


def test_int_clipping():
    x = np.array([-100, 100, 7.4, 7.6, -8.4, -8.6, np.inf, -np.inf])
    assert np.array_equal(INT4.quantize(x), np.array([-8, 7, 7, 7, -8, -8, 7, -8], np.float32))
    assert np.array_equal(UINT4.quantize(np.array([-3.0, 15.7, 40])), np.array([0, 15, 15], np.float32))
    assert np.array_equal(INT2.quantize(np.array([-5.0, 5.0])), np.array([-2, 1], np.float32))


def test_sub_byte_int_storage_via_ml_dtypes():
    for fmt, dtype in ((INT4, ml_dtypes.int4), (UINT4, ml_dtypes.uint4), (INT2, ml_dtypes.int2), (UINT2, ml_dtypes.uint2)):
        x = np.arange(fmt.qmin, fmt.qmax + 1, dtype=np.float32)
        s = fmt.to_storage(x)
        assert s.dtype == np.dtype(dtype)
        assert np.array_equal(s, x.astype(dtype))
    assert INT8.to_storage(np.array([300.0])).dtype == np.int8


def test_int_refuses_nan_and_bad_codes():
    with pytest.raises(FormatError, match="NaN"):
        INT8.quantize(np.array([1.0, np.nan]))
    with pytest.raises(FormatError, match=r"\[-8, 7\]"):
        INT4.decode(np.array([8]))
    with pytest.raises(FormatError, match="integer"):
        INT4.decode(np.array([1.0]))
    with pytest.raises(FormatError, match=r"\[0, 15\]"):
        FP4_E2M1.decode(np.array([16]))


@pytest.mark.parametrize(("bits", "signed"), [(1, True), (9, False), (16, True), (4.0, True)])
def test_int_widths_outside_2_to_8_refused(bits, signed):
    with pytest.raises(FormatError, match="2 to 8 bits"):
        IntFormat(bits, signed)


# --- FloatFormat validation ----------------------------------------------------------------------


def _e4m3(**over):
    kw = dict(name="x", exp_bits=4, man_bits=3, bias=7, has_inf=False, nan="all_ones", max_finite=448.0)
    return FloatFormat(**{**kw, **over})


def test_float_format_consistent_definition_builds():
    assert _e4m3(name="fp8_e4m3") == FP8_E4M3


@pytest.mark.parametrize(("over", "match"), [
    ({"max_finite": 480.0}, "max_finite"),          # E4M3 max is 448, not the generic formula
    ({"max_finite": float("inf")}, "max_finite"),
    ({"nan": "sometimes"}, "nan must be"),
    ({"has_inf": True}, "inf"),
    ({"man_bits": 4}, "at most 8 bits"),
    ({"exp_bits": 0}, "exp_bits"),
    ({"bias": 7.0}, "bias"),
    ({"subnormals": False}, "unsigned"),
])
def test_float_format_validation(over, match):
    with pytest.raises(FormatError, match=match):
        _e4m3(**over)


# --- registry ------------------------------------------------------------------------------------


def test_registry():
    for name, fmt in FORMATS.items():
        assert get_format(name) is fmt and fmt.name == name
    assert get_format("fp8_e4m3") is FP8_E4M3 and get_format("e8m0") is E8M0


@pytest.mark.parametrize("name", ["int9", "fp8", "FP8_E4M3", "", None])
def test_unknown_format_lists_known_names(name):
    with pytest.raises(FormatError, match="known formats: .*fp8_e4m3"):
        get_format(name)


# --- granularity and QuantSpec -------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "text"), [
    (QuantSpec(INT4, PerBlock(0, 128)), "int4:block(0,128):sym"),
    (QuantSpec(INT8, PerChannel(1)), "int8:channel(1):sym"),
    (QuantSpec(INT8, PerTensor(), symmetric=False, scale_method="percentile(99.99)"), "int8:tensor:asym:percentile(99.99)"),
    (QuantSpec(FP8_E4M3), "fp8_e4m3:tensor:sym"),
    (QuantSpec(INT8, PerToken(), dynamic=True), "int8:token:sym:dynamic"),
    (QuantSpec(FP4_E2M1, PerBlock(1, 32), scale_format=E8M0), "fp4_e2m1:block(1,32):sym:scale=e8m0"),
    (QuantSpec(FP4_E2M1, PerBlock(-1, 16), scale_format=FP8_E4M3), "fp4_e2m1:block(-1,16):sym:scale=fp8_e4m3"),
    (QuantSpec(UINT8, symmetric=False, scale_method="mse"), "uint8:tensor:asym:mse"),
])
def test_spec_printed_form(spec, text):
    assert str(spec) == text
    assert QuantSpec.parse(text) == spec


def test_spec_parse_defaults_spaces_and_percentile_spelling():
    assert QuantSpec.parse("int8") == QuantSpec(INT8)
    assert QuantSpec.parse("int4:block( 0 , 128 )") == QuantSpec(INT4, PerBlock(0, 128))
    assert QuantSpec.parse("uint8:asym") == QuantSpec(UINT8, symmetric=False)
    spec = QuantSpec(INT8, scale_method="percentile:99.99")
    assert spec.scale_method == "percentile(99.99)" and spec.percentile == 99.99
    assert spec == QuantSpec.parse("int8:tensor:sym:percentile(99.99)")
    assert QuantSpec(INT8, scale_method="percentile(100.0)").scale_method == "percentile(100)"
    assert QuantSpec(INT8).percentile is None


def test_spec_is_frozen():
    spec = QuantSpec(INT8)
    with pytest.raises(AttributeError):
        spec.symmetric = False  # type: ignore[misc]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"format": FP8_E4M3, "symmetric": False}, "asymmetric"),
    ({"format": FP4_E2M1, "symmetric": False}, "asymmetric"),
    ({"format": E8M0}, "scale format only"),
    ({"format": "int8"}, "IntFormat or FloatFormat"),
    ({"format": INT8, "scale_method": "max"}, "unknown scale method"),
    ({"format": INT8, "scale_method": "percentile(0)"}, r"\(0, 100\]"),
    ({"format": INT8, "scale_method": "percentile(100.5)"}, r"\(0, 100\]"),
    ({"format": INT8, "scale_method": "percentile(nan)"}, r"\(0, 100\]"),
    ({"format": INT8, "scale_method": "percentile(abc)"}, "number"),
    ({"format": INT8, "scale_method": "percentile(99"}, "unknown scale method"),
    ({"format": INT8, "scale_format": INT8}, "scale_format"),
    ({"format": INT8, "granularity": PerToken()}, "needs 'dynamic'"),
    ({"format": INT8, "dynamic": True, "scale_method": "mse"}, "dynamic"),
    ({"format": INT8, "granularity": "tensor"}, "granularity"),
    ({"format": INT8, "symmetric": 1}, "bools"),
])
def test_spec_validation(kwargs, match):
    with pytest.raises(FormatError, match=match):
        QuantSpec(**kwargs)


@pytest.mark.parametrize(("make", "match"), [
    (lambda: PerBlock(0, 0), "positive"),
    (lambda: PerBlock(0, -32), "positive"),
    (lambda: PerBlock(0, 32.0), "size must be an int"),
    (lambda: PerChannel("1"), "axis must be an int"),
    (lambda: PerChannel(True), "axis must be an int"),
])
def test_granularity_validation(make, match):
    with pytest.raises(FormatError, match=match):
        make()


@pytest.mark.parametrize(("text", "offending"), [
    ("", "empty"),
    ("int8:", "''"),
    ("int8:sym:tensor", "'tensor' is repeated or out of order"),
    ("int8:tensor:sym:sym", "'sym' is repeated"),
    ("int8:block(0)", "'block\\(0\\)'"),
    ("int8:block(0,0)", "positive"),
    ("int8:tensor:sym:foo", "'foo'"),
    ("int9:tensor:sym", "int9"),
    ("fp4_e2m1:block(1,32):sym:scale=e9m0", "e9m0"),
    ("int8:tensor:sym:percentile", "percentile"),
    ("fp8_e4m3:tensor:asym", "asymmetric"),
    ("int8:token:sym", "dynamic"),
])
def test_spec_parse_errors_name_the_offending_text(text, offending):
    with pytest.raises(FormatError, match=offending):
        QuantSpec.parse(text)


# --- scale helpers -------------------------------------------------------------------------------


def test_symmetric_scale():
    s = symmetric_scale(np.array([0.0, 7.0, 14.0]), INT4)
    assert np.array_equal(s, np.array([1.0, 1.0, 2.0], np.float32)) and s.dtype == np.float32
    assert np.array_equal(symmetric_scale(np.array([448.0]), FP8_E4M3), np.array([1.0], np.float32))
    # an all-zero group dequantizes to exactly 0, never NaN/inf
    assert np.array_equal(INT4.quantize(np.zeros(4) / s[0]) * s[0], np.zeros(4, np.float32))
    for bad in ([-1.0], [np.nan], [np.inf]):
        with pytest.raises(FormatError, match="absmax"):
            symmetric_scale(np.array(bad), INT8)


def test_asymmetric_scale_zero_point():
    s, zp = asymmetric_scale_zero_point(np.array([-1.0, 2.0, 0.0]), np.array([3.0, 5.0, 0.0]), UINT8)
    assert np.allclose(s, np.array([4 / 255, 5 / 255, 1.0], np.float32), rtol=0, atol=0)
    assert zp.dtype == np.uint8 and list(zp) == [64, 0, 0]  # rint(63.75); range widened to include 0
    # zero is exact: dequant(quant(0)) == 0
    assert (UINT8.quantize(0.0 / s + zp) - zp == 0).all()
    s8, zp8 = asymmetric_scale_zero_point(-4.0, -1.0, INT8)
    assert zp8.dtype == np.int8 and int(zp8) == 127 and float(s8) == np.float32(4 / 255)
    with pytest.raises(FormatError, match="integer format"):
        asymmetric_scale_zero_point(0.0, 1.0, FP8_E4M3)
    with pytest.raises(FormatError, match="min must not exceed max"):
        asymmetric_scale_zero_point(2.0, 1.0, UINT8)
    with pytest.raises(FormatError, match="finite"):
        asymmetric_scale_zero_point(-np.inf, 1.0, UINT8)


# --- properties ----------------------------------------------------------------------------------

ALL = list(FORMATS.values())
f32 = st.floats(allow_nan=False, allow_infinity=True, width=32)


@settings(max_examples=200, deadline=None)
@given(fmt=st.sampled_from(ALL), xs=st.lists(f32, min_size=1, max_size=8))
def test_quantize_is_idempotent(fmt, xs):
    q = fmt.quantize(np.array(xs, np.float32))
    assert same(fmt.quantize(q), q)


@settings(max_examples=200, deadline=None)
@given(fmt=st.sampled_from([f for f in ALL if f.has_zero]), u=st.floats(-1, 1, width=64),
       log_scale=st.floats(-12, 0))
def test_error_within_half_a_step_inside_the_range(fmt, u, log_scale):
    x = np.float32(u * fmt.max_finite * 2.0**log_scale)
    unsigned = fmt.qmin == 0 if isinstance(fmt, IntFormat) else not fmt.signed
    if unsigned:
        x = np.abs(x)
    q = float(fmt.quantize(np.array([x]))[0])
    if isinstance(fmt, IntFormat):
        grid = np.arange(fmt.qmin, fmt.qmax + 1, dtype=np.float64)
    else:
        grid = finite_values(fmt)
    lower, upper = grid[grid <= x].max(), grid[grid >= x].min()
    assert q in (lower, upper)
    assert abs(q - float(x)) <= (upper - lower) / 2


@settings(max_examples=200, deadline=None)
@given(fmt=st.sampled_from(ALL), factor=st.floats(1, 1e30), sign=st.sampled_from([-1.0, 1.0]))
def test_saturation_at_max_finite(fmt, factor, sign):
    if sign < 0 and isinstance(fmt, IntFormat):  # the negative end of an int range is qmin
        q = float(fmt.quantize(np.array([min(fmt.qmin, -1) * factor]))[0])
        assert q == fmt.qmin
        return
    q = float(fmt.quantize(np.array([sign * fmt.max_finite * factor]))[0])
    if sign > 0:
        assert q == fmt.max_finite
    elif fmt.signed:
        assert q == -fmt.max_finite
    else:
        assert math.isnan(q)  # E8M0 has no sign


granularities = st.one_of(
    st.just(PerTensor()),
    st.builds(PerChannel, st.integers(-4, 4)),
    st.builds(PerBlock, st.integers(-4, 4), st.integers(1, 4096)),
    st.just(PerToken()),
)
methods = st.one_of(st.sampled_from(["minmax", "mse"]),
                    st.floats(1e-6, 100).map(lambda p: f"percentile({p!r})"))


@st.composite
def specs(draw):
    fmt = draw(st.sampled_from([f for f in ALL if f.has_zero]))
    gran = draw(granularities)
    symmetric = True if isinstance(fmt, FloatFormat) else draw(st.booleans())
    dynamic = isinstance(gran, PerToken) or draw(st.booleans())
    method = "minmax" if dynamic else draw(methods)
    scale_format = draw(st.one_of(st.none(), st.sampled_from([E8M0, FP8_E4M3, FP8_E5M2])))
    return QuantSpec(fmt, gran, symmetric, method, scale_format, dynamic)


@settings(max_examples=300, deadline=None)
@given(spec=specs())
def test_spec_round_trips_through_text(spec):
    text = str(spec)
    assert QuantSpec.parse(text) == spec
    assert str(QuantSpec.parse(text)) == text


# --- what backends read instead of restating: dtype names and special codes ------------------------


@pytest.mark.parametrize("fmt,dtype", ML, ids=ML_IDS)
def test_float_dtype_name_and_special_codes_match_ml_dtypes(fmt, dtype):
    assert fmt.dtype_name == np.dtype(dtype).name and getattr(ml_dtypes, fmt.dtype_name) is dtype
    values = ml_table(dtype, fmt.bits)
    assert values[fmt.max_code] == fmt.max_finite and fmt.max_code < 1 << (fmt.bits - int(fmt.signed))
    if fmt.has_inf:
        assert values[fmt.inf_code] == np.inf
    else:
        assert fmt.inf_code is None and not np.isinf(values).any()
    if fmt.has_nan:
        assert np.isnan(values[fmt.nan_code]) and fmt.encode(np.array([np.nan]))[0] == fmt.nan_code
    else:
        assert fmt.nan_code is None


def test_fp8_special_codes():
    assert (FP8_E4M3.max_code, FP8_E4M3.inf_code, FP8_E4M3.nan_code) == (0x7E, None, 0x7F)
    assert (FP8_E5M2.max_code, FP8_E5M2.inf_code, FP8_E5M2.nan_code) == (0x7B, 0x7C, 0x7E)
    assert fp8_exmy(3, 4).dtype_name is None and fp8_exmy(3, 4).max_code == 0x7F


def test_int_dtype_names_match_ml_dtypes_and_numpy():
    for fmt, dtype in ((INT2, ml_dtypes.int2), (UINT2, ml_dtypes.uint2), (INT4, ml_dtypes.int4),
                       (UINT4, ml_dtypes.uint4), (INT8, np.int8), (UINT8, np.uint8)):
        assert fmt.dtype_name == np.dtype(dtype).name
        info = ml_dtypes.iinfo(dtype) if fmt.bits < 8 else np.iinfo(dtype)
        assert (fmt.qmin, fmt.qmax) == (info.min, info.max)
    assert IntFormat(3, True).dtype_name is None  # stored in an int4 container, not an int4
