"""The progress callback long stages report to: `progress(stage, done, total)`.

`stage` names what runs ("calibrate", "select: sensitivity", ...), `done` of `total` units are
finished; the CLI draws it as one self-overwriting line per stage. Stages call it with done ==
total when they finish."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]
