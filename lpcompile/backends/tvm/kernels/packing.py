"""Compile-time weight repacking (numpy only): ONNX weight layouts -> the kernels' layouts.

The nibble layout (`NIBBLE`, a `NibbleLayout`) of int4 weights, chosen for the CPU GEMV, which streams the weights once per token:
eight 4-bit values per uint32, tile-major `[ceil(N / 128), K_pad, 16]`. Element (k, n) lives in
tile `n // 128`; inside the tile, output j = n % 128 is nibble `j // 16` of word `j % 16`.

- One k-row of a tile is 16 words = one 64-byte cache line, and a tile (all K rows) is one
  contiguous panel, so each thread streams its tiles front to back.
- Nibble h of the 16 words is a contiguous run of 16 outputs (16h .. 16h + 15): decoding one
  AVX-512 vector of weights is a shift-left and an arithmetic shift-right of the loaded words,
  with no shuffles, and the 8 nibbles feed 8 independent accumulators (enough to hide the FMA
  latency).
- Measured on this AVX-512 host (warm, 4096x4096, 2 threads): 250 us for this layout against
  440 us for two-per-byte (uint8) packing with the same schedule, whose 64 bytes per k-row
  decode into interleaved halves and give fewer independent accumulators.

K is padded with zero weights to whole scale blocks, N with zero tiles; padding contributes 0.
8-bit weights (INT8, FP8) stay row-major [K, N].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lpcompile.errors import ModelError
from lpcompile.formats import INT4

BLOCK = 128


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_int4(q: np.ndarray) -> None:
    if q.size and (q.min() < INT4.qmin or q.max() > INT4.qmax):
        raise ModelError(f"int4 weights out of range [{INT4.qmin}, {INT4.qmax}]")


@dataclass(frozen=True)
class NibbleLayout:
    """Signed int4 packed 8 per uint32 in tiles of `lanes * 8` outputs (see the module doc)."""

    lanes: int = 16
    per_word: int = 8

    @property
    def tile(self) -> int:
        return self.lanes * self.per_word

    def packed_shape(self, k_pad: int, n: int) -> tuple[int, int, int]:
        return (ceil_div(n, self.tile), k_pad, self.lanes)

    def pack(self, q: np.ndarray, k_pad: int | None = None) -> np.ndarray:
        """q: int4 values (in [-8, 7]), shape [K, N] -> uint32 [ceil(N/tile), k_pad, lanes]."""
        if q.ndim != 2:
            raise ModelError(f"int4 weights must be 2-D [K, N], got shape {q.shape}")
        k, n = q.shape
        k_pad = k if k_pad is None else k_pad
        q = q.astype(np.int64)
        _check_int4(q)
        tiles = ceil_div(n, self.tile)
        full = np.zeros((k_pad, tiles * self.tile), np.int64)
        full[:k, :n] = q
        # [k, tile, nibble h, lane l] -> word [tile, k, l] = sum_h (v & 15) << 4h
        nib = (full & 0xF).reshape(k_pad, tiles, self.per_word, self.lanes)
        shifts = (4 * np.arange(self.per_word, dtype=np.int64))[None, None, :, None]
        words = (nib << shifts).sum(axis=2)  # [k, tiles, lanes]
        return np.ascontiguousarray(words.transpose(1, 0, 2).astype(np.uint32))

    def unpack(self, packed: np.ndarray, k: int, n: int) -> np.ndarray:
        """Inverse of `pack`: int8 [k, n]."""
        words = packed.astype(np.int64).transpose(1, 0, 2)  # [k_pad, tiles, lanes]
        shifts = (4 * np.arange(self.per_word, dtype=np.int64))[None, None, :, None]
        nib = (words[:, :, None, :] >> shifts) & 0xF  # [k_pad, tiles, h, l]
        vals = np.where(nib >= 8, nib - 16, nib).reshape(words.shape[0], -1)
        return vals[:k, :n].astype(np.int8)


NIBBLE = NibbleLayout()


def blocked_scales(scale: np.ndarray, k: int, n: int, block_size: int | None) -> tuple[np.ndarray, int]:
    """Normalise weight scales to `[num_blocks, N]` float32 along K; returns (scales, block).

    Accepts a scalar (per-tensor), [N] (per-channel) or [ceil(K/B), N] (blocked along K). A
    per-tensor or per-channel scale is one block spanning all of K.
    """
    scale = np.asarray(scale, np.float32)
    if scale.size == 1:
        return np.full((1, n), scale.reshape(()), np.float32), k
    if scale.ndim == 1:
        if scale.shape[0] != n:
            raise ModelError(f"per-channel scale has {scale.shape[0]} entries for {n} output channels")
        return scale.reshape(1, n).copy(), k
    if block_size is None or scale.shape != (ceil_div(k, block_size), n):
        raise ModelError(f"blocked scale shape {scale.shape} does not fit weights [{k}, {n}] / block {block_size}")
    return np.ascontiguousarray(scale), block_size


def onnx_weight_to_kn(
    q: np.ndarray, scale: np.ndarray, *, axis: int, block_size: int | None, transposed: bool
) -> tuple[np.ndarray, np.ndarray, int]:
    """An ONNX `DequantizeLinear` weight feeding a matmul -> (q [K, N], scales [blocks, N], block).

    `transposed`: the weight is Gemm's `B` with `transB=1`, stored [N, K]; then a per-channel
    scale is on axis 0 and a blocked scale ([N, K/B]) on axis 1. Otherwise it is MatMul's [K, N]
    (per-channel axis 1, blocked axis 0). A block size spanning all of K is per-channel.
    """
    q = np.asarray(q)
    scale = np.asarray(scale, np.float32)
    if q.ndim != 2:
        raise ModelError(f"quantized matmul weights must be 2-D, got shape {q.shape}")
    k_axis = 1 if transposed else 0
    blocked = scale.ndim == 2
    if blocked and axis % 2 != k_axis:
        raise ModelError(f"blocked weight scales must run along K (axis {k_axis}), got axis {axis}")
    if not blocked and scale.size > 1 and axis % 2 == k_axis:
        raise ModelError("a per-channel weight scale must be on the output-channel axis")
    if transposed:
        q = q.T
        scale = scale.T if blocked else scale
    k, n = q.shape
    s, block = blocked_scales(scale, k, n, block_size if blocked else None)
    return np.ascontiguousarray(q), s, block


@dataclass(frozen=True)
class Dot4Layout:
    """8-bit weights for 4-way integer dot-product instructions (x86 VNNI `vpdpbusd`: 16 int32
    lanes, each the dot product of 4 activation bytes with 4 weight bytes): `[ceil(N / 16), K_pad / 4,
    16, 4]`, element (k, n) at `[n // 16, k // 4, n % 16, k % 4]`. One 64-byte row holds the 4
    consecutive k of 16 consecutive outputs: one instruction's weight operand. N is padded with
    zero outputs, K with zero weights."""

    lanes: int = 16
    group: int = 4

    def packed_shape(self, k_pad: int, n: int) -> tuple[int, int, int, int]:
        return (ceil_div(n, self.lanes), k_pad // self.group, self.lanes, self.group)

    def pack(self, q: np.ndarray, k_pad: int) -> np.ndarray:
        k, n = q.shape
        if k_pad % self.group or k_pad < k:
            raise ModelError(f"dot4 layout: K_pad {k_pad} must be a multiple of {self.group} and >= K {k}")
        tiles = ceil_div(n, self.lanes)
        full = np.zeros((k_pad, tiles * self.lanes), q.dtype)
        full[:k, :n] = q
        return np.ascontiguousarray(full.reshape(k_pad // self.group, self.group, tiles, self.lanes).transpose(2, 0, 3, 1))


DOT4 = Dot4Layout()


@dataclass(frozen=True)
class Nibble8Layout:
    """int4 weights for `vpdpbusd` with int8 activations (W4A8): `[ceil(N / 16), K_pad / 8, 16, 4]`
    uint8, byte (t, q, l, j) = u(k = 8q + j) | u(k = 8q + 4 + j) << 4 for output n = 16t + l, where
    u = w + 8 in [0, 15] (unsigned, as the instruction's first operand must be: sum u x =
    sum w x + 8 sum x, the kernel subtracts 8 sum x). One 64-byte row is two instructions' weight
    operands (low nibbles: k 8q..8q+3; high: 8q+4..8q+7), unpacked with an AND and a shift."""

    lanes: int = 16
    group: int = 8

    @property
    def offset(self) -> int:
        """What the stored unsigned nibble adds to the int4 value (8)."""
        return -INT4.qmin

    def packed_shape(self, k_pad: int, n: int) -> tuple[int, int, int, int]:
        return (ceil_div(n, self.lanes), k_pad // self.group, self.lanes, 4)

    def pack(self, q: np.ndarray, k_pad: int) -> np.ndarray:
        k, n = q.shape
        if k_pad % self.group or k_pad < k:
            raise ModelError(f"nibble8 layout: K_pad {k_pad} must be a multiple of {self.group} and >= K {k}")
        _check_int4(q)
        tiles = ceil_div(n, self.lanes)
        u = np.full((k_pad, tiles * self.lanes), self.offset, np.uint8)  # padding: value 0
        u[:k, :n] = (q.astype(np.int16) + self.offset).astype(np.uint8)
        u = u.reshape(k_pad // 8, 2, 4, tiles, self.lanes)  # [q, half, j, t, l]
        packed = u[:, 0] | (u[:, 1] << 4)  # [q, j, t, l]
        return np.ascontiguousarray(packed.transpose(2, 0, 3, 1))


NIB8 = Nibble8Layout()
