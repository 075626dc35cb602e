"""Held-out English sentences for MiniLM calibration and evaluation.

`calib_sentences()` (222 lines) and `eval_sentences()` (224 lines) are disjoint sets of varied
sentences (science, cooking, sports, programming, travel, history, finance, health, weather,
music, everyday chat, questions; 1 to ~40 words, some with numbers and punctuation), shipped as
package data in `models/data/`.  Use the calibration set to calibrate, the evaluation set to
measure accuracy; never the other way round.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

__all__ = ["eval_sentences", "calib_sentences"]


@lru_cache(maxsize=None)
def _load(name: str) -> tuple[str, ...]:
    text = resources.files("models").joinpath("data", name).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def eval_sentences() -> list[str]:
    """The evaluation sentences (held out from calibration)."""
    return list(_load("eval_sentences.txt"))


def calib_sentences() -> list[str]:
    """The calibration sentences (disjoint from `eval_sentences()`)."""
    return list(_load("calib_sentences.txt"))
