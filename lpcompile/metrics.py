"""How far a quantized result is from its float reference: SQNR and cosine, one convention.

    sqnr_db(ref, got)            10 · log10(Σ ref² / Σ (ref − got)²), over all values, in dB
    nsr_to_db(nsr)               the same from a noise-to-signal ratio Σ (ref − got)² / Σ ref²
    signal_noise_db(sig, noise)  the same from sums accumulated over batches
    cosine(ref, got)             cosine similarity per sample (row of the first axis)

Sums are taken in float64 whatever the inputs' dtype.

Zero error. SQNR is capped at ±`EXACT_DB` (200 dB): no error at all is +200 dB, an error
against an all-zero reference −200 dB. Every SQNR lpcompile computes ends up in JSON (plans,
reports, with `allow_nan=False`) and in the solver's sums and comparisons, so it is a plain
finite number everywhere rather than an infinity that each writer would have to special-case.
200 dB is far beyond any real quantization error (float32 rounding alone is about 150 dB), so a
value at the cap means "exact", and the markdown report prints it so (`format_db`). Nothing to
measure (no values, or NaN in the result) is NaN in memory and null ("n/a") in JSON.

Cosine: 1.0 where both rows are zero (identical), 0.0 where only one of them is.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["EXACT_DB", "cosine", "format_db", "nsr_to_db", "signal_noise_db", "sqnr_db"]

EXACT_DB = 200.0


def nsr_to_db(nsr: float) -> float:
    """−10 · log10(nsr) in [−EXACT_DB, EXACT_DB]: nsr 0 gives EXACT_DB, NaN stays NaN."""
    nsr = float(nsr)
    if math.isnan(nsr):
        return math.nan
    if nsr <= 0.0:
        return EXACT_DB
    if math.isinf(nsr):
        return -EXACT_DB
    return min(max(-10.0 * math.log10(nsr), -EXACT_DB), EXACT_DB)


def signal_noise_db(signal: float, noise: float) -> float:
    """SQNR of accumulated sums Σ ref² (`signal`) and Σ (ref − got)² (`noise`)."""
    signal, noise = float(signal), float(noise)
    if math.isnan(signal) or math.isnan(noise):
        return math.nan
    if noise == 0.0:
        return EXACT_DB
    if signal == 0.0:
        return -EXACT_DB
    return nsr_to_db(noise / signal)


def sqnr_db(ref, got) -> float:
    """SQNR of `got` against `ref` over all values (same shape), in dB; NaN when empty."""
    ref64 = np.asarray(ref, dtype=np.float64)
    got64 = np.asarray(got, dtype=np.float64)
    if ref64.size == 0:
        return math.nan
    return signal_noise_db(float((ref64**2).sum()), float(((ref64 - got64) ** 2).sum()))


def cosine(ref, got) -> np.ndarray:
    """float64 cosine similarity of each sample (row of the first axis, the rest flattened; a
    1-D input is one sample) of `got` with the same sample of `ref`."""
    r = np.asarray(ref, dtype=np.float64)
    g = np.asarray(got, dtype=np.float64)
    r = r.reshape(r.shape[0], -1) if r.ndim > 1 else r.reshape(1, -1)
    g = g.reshape(r.shape)
    nr, ng = np.linalg.norm(r, axis=1), np.linalg.norm(g, axis=1)
    den = nr * ng
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (r * g).sum(axis=1) / np.where(den > 0, den, 1.0)
    return np.where(den > 0, cos, np.where((nr == 0) & (ng == 0), 1.0, 0.0))


def format_db(db: float | None, digits: int = 2) -> str:
    """An SQNR for people: "exact" at the cap, "n/a" when not measured (None or NaN)."""
    if db is None or math.isnan(db):
        return "n/a"
    if db >= EXACT_DB:
        return "exact"
    return f"{db:.{digits}f}"
