"""lpcompile.metrics: one SQNR / cosine convention (capped at ±EXACT_DB, JSON-safe)."""

import json
import math

import numpy as np
import pytest

from lpcompile.metrics import EXACT_DB, cosine, format_db, nsr_to_db, signal_noise_db, sqnr_db


def test_sqnr_matches_the_definition():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 64)).astype(np.float32)
    got = ref + 0.01 * rng.standard_normal(ref.shape).astype(np.float32)
    r, g = ref.astype(np.float64), got.astype(np.float64)
    want = 10 * np.log10((r**2).sum() / ((r - g) ** 2).sum())
    assert sqnr_db(ref, got) == pytest.approx(want, rel=1e-12)
    assert nsr_to_db(((r - g) ** 2).sum() / (r**2).sum()) == pytest.approx(want, rel=1e-12)
    assert signal_noise_db((r**2).sum(), ((r - g) ** 2).sum()) == pytest.approx(want, rel=1e-12)


def test_zero_error_and_degenerate_cases_are_finite_and_json_safe():
    x = np.arange(8, dtype=np.float32)
    values = [sqnr_db(x, x), nsr_to_db(0.0), signal_noise_db(0.0, 0.0),  # exact
              sqnr_db(np.zeros(4), np.ones(4)), nsr_to_db(math.inf), signal_noise_db(0.0, 1.0)]  # all error
    assert values == [EXACT_DB] * 3 + [-EXACT_DB] * 3
    json.dumps(values, allow_nan=False)
    assert nsr_to_db(1e-30) == EXACT_DB and nsr_to_db(1e30) == -EXACT_DB  # clipped, not beyond
    assert math.isnan(sqnr_db(np.zeros(0), np.zeros(0))) and math.isnan(sqnr_db(x, x * np.nan))
    assert (format_db(EXACT_DB), format_db(None), format_db(math.nan), format_db(12.345)) == ("exact", "n/a", "n/a", "12.35")


def test_cosine_per_sample():
    ref = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [2.0, 0.0]])
    got = np.array([[0.0, 1.0], [2.0, 2.0], [0.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(cosine(ref, got), [0.0, 1.0, 1.0, 0.0])  # both zero: 1, one zero: 0
    np.testing.assert_allclose(cosine(np.ones(5), -np.ones(5)), [-1.0])  # a 1-D input is one sample
    x = np.random.default_rng(1).standard_normal((3, 2, 4))
    np.testing.assert_allclose(cosine(x, 2 * x), np.ones(3))
