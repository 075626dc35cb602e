"""lpcompile's on-disk cache: measurements worth keeping between runs (kernel latencies, select's
per-layer sensitivities), in $LPCOMPILE_CACHE (default ~/.cache/lpcompile).

The cache is an optimisation, never a source of truth: entries are keyed by everything they depend
on, a missing, unreadable or unwritable cache is a warning and a re-measurement, never an error,
and files are replaced atomically (a killed run leaves the old entry or none)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ENV = "LPCOMPILE_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lpcompile")


def read_json(name: str) -> dict | None:
    """The JSON object cached under `name`, or None (absent, unreadable or not an object)."""
    path = cache_dir() / name
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("cache: ignoring %s (%s)", path, e)
        return None
    return data if isinstance(data, dict) else None


def write_json(name: str, data: dict) -> Path | None:
    """Cache `data` under `name` (atomically); None when the cache cannot be written (a warning)."""
    path = cache_dir() / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, allow_nan=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except (OSError, ValueError, TypeError) as e:
        log.warning("cache: not written to %s (%s)", path, e)
        return None
    return path
