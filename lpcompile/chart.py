"""The per-layer chart of `--format auto` as a PNG, written with zlib alone (no plotting library
is a dependency of lpcompile).

Two heat maps side by side, one row per layer (row numbers match the report's table):
- left: end-to-end output SQNR with only that layer's weights quantized, one column per weight
  candidate plus "float"; the chosen format is boxed;
- right: the layer-local SQNR of the input in each ExMy FP8 format (E2M5, E3M4, E4M3, E5M2);
  the best is boxed.
Colour runs from dark red (0 dB) through yellow to bright green (60 dB and above).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from lpcompile.metrics import EXACT_DB

_DIGITS = {  # 3x5 bitmaps, rows top to bottom
    "0": ("111", "101", "101", "101", "111"), "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"), "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"), "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"), "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"), "9": ("111", "101", "111", "001", "111"),
}
CELL_W, CELL_H, LABEL_W, TOP, GAP, SCALE, LEGEND = 28, 14, 30, 18, 16, 2, 34
EXMY_COLUMNS = ("e2m5", "e3m4", "e4m3", "e5m2")


def sqnr_colour(db: float | None) -> tuple[int, int, int]:
    if db is None or not np.isfinite(db):
        return (200, 200, 200)
    t = float(np.clip(db / 60.0, 0.0, 1.0))
    if t < 0.5:  # dark red -> yellow
        u = t / 0.5
        return (int(140 + 115 * u), int(230 * u), 0)
    u = (t - 0.5) / 0.5  # yellow -> green
    return (int(255 * (1 - u)), int(230 - 40 * u), int(40 * u))


def _text(img: np.ndarray, x: int, y: int, text: str) -> None:
    for ch in text:
        glyph = _DIGITS.get(ch)
        if glyph:
            for r, row in enumerate(glyph):
                for c, bit in enumerate(row):
                    if bit == "1":
                        img[y + r * SCALE : y + (r + 1) * SCALE, x + c * SCALE : x + (c + 1) * SCALE] = 0
        x += 4 * SCALE


def _box(img: np.ndarray, x: int, y: int) -> None:
    for t in range(2):  # two pixels wide
        img[y + t, x : x + CELL_W] = img[y + CELL_H - 1 - t, x : x + CELL_W] = 0
        img[y : y + CELL_H, x + t] = img[y : y + CELL_H, x + CELL_W - 1 - t] = 0


def columns(select: dict) -> list[str]:
    """The weight formats of the left map, in column order."""
    return list(dict.fromkeys(k for r in select["layers"] for k in r["e2e_sqnr_db"])) + ["float"]


def render(select: dict) -> np.ndarray:
    """The chart of `report["select"]` as an RGB uint8 image."""
    rows = select["layers"]
    columns_ = columns(select)
    left = LABEL_W
    right = left + len(columns_) * CELL_W + GAP
    width = right + len(EXMY_COLUMNS) * CELL_W + 4
    width = max(width, LABEL_W + 7 * 4 * CELL_W // 4 + 8)
    height = TOP + len(rows) * CELL_H + 4 + LEGEND
    img = np.full((height, width, 3), 255, np.uint8)
    # legend: the colour scale, ticks every 10 dB
    y0 = TOP + len(rows) * CELL_H + 8
    span = 6 * CELL_W
    for i in range(span):
        img[y0 : y0 + 10, left + i] = sqnr_colour(60.0 * i / (span - 1))
    for db in range(0, 70, 10):
        x = left + min(int(db / 60 * (span - 1)), span - 1)
        img[y0 + 10 : y0 + 13, x] = 0
        _text(img, max(x - 3, 0), y0 + 14, str(db))
    for j in range(len(columns_)):
        _text(img, left + j * CELL_W + CELL_W // 2 - 3, 2, str(j % 10))
    for j in range(len(EXMY_COLUMNS)):
        _text(img, right + j * CELL_W + CELL_W // 2 - 3, 2, str(j + 2))  # the exponent bits
    for i, r in enumerate(rows):
        y = TOP + i * CELL_H
        _text(img, 2, y + 2, str(i))
        for j, col in enumerate(columns_):
            x = left + j * CELL_W
            db = EXACT_DB if col == "float" else r["e2e_sqnr_db"].get(col)
            img[y : y + CELL_H, x : x + CELL_W] = sqnr_colour(db)
            if col == r["weights"]:
                _box(img, x, y)
        act = (r.get("exmy") or {}).get("activations_db") or {}
        best = ((r.get("exmy") or {}).get("activations_best") or {}).get("exmy")
        for j, name in enumerate(EXMY_COLUMNS):
            x = right + j * CELL_W
            img[y : y + CELL_H, x : x + CELL_W] = sqnr_colour(act.get(name))
            if name == best:
                _box(img, x, y)
    return img


def write_png(path: str | Path, img: np.ndarray) -> None:
    """An RGB uint8 image as a PNG (8-bit truecolour, no filtering)."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


def write_select_chart(select: dict, path: str | Path) -> None:
    write_png(path, render(select))
