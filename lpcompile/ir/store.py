"""Weights a pass creates, written to a scratch file instead of kept in memory, and weights read
one at a time: what keeps compiling a model larger than memory bounded by its largest layer.

    store = TensorStore()                      # a scratch directory, removed with the store
    attach_store(model, store)                 # passes now spill what they create
    value.const_value = new_tensor(graph, array, name)   # in a pass: an ir.Tensor, or an
                                               # ir.ExternalTensor in the store (memory-mapped)
    w = read_weight(value.const_value)         # a float32 copy; the mapping is dropped again

A model's own external data stays where it is (memory-mapped, read lazily); the store holds
what passes write (rotated weights, quantized codes), which would otherwise all stay in memory
until the result is saved. Stored tensors are immutable, like every tensor in the IR.
"""

from __future__ import annotations

import ctypes
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
import onnx_ir as ir

STORE_KEY = "lpcompile.tensor_store"  # graph.meta: the TensorStore passes spill new weights to
_ALIGN = 4096


class TensorStore:
    """An append-only file of tensors in a scratch directory (deleted when the store is garbage
    collected, or at exit). Tensors under `min_bytes` stay in memory."""

    def __init__(self, directory: str | Path | None = None, min_bytes: int = 1 << 20):
        self.dir = Path(tempfile.mkdtemp(prefix="lpcompile-weights-", dir=directory))
        self.path = self.dir / "weights.data"
        self.min_bytes = min_bytes
        self.bytes_written = 0
        self._file = open(self.path, "wb")
        self._finalizer = weakref.finalize(self, _remove, self._file, self.dir)

    def put(self, tensor: ir.TensorProtocol) -> ir.TensorProtocol:
        """`tensor` itself if small, else the same data as an `ir.ExternalTensor` in the store."""
        if tensor.nbytes < self.min_bytes or isinstance(tensor, ir.ExternalTensor):
            return tensor
        data = tensor.tobytes()  # packed for 4-bit types, little endian: the ONNX layout
        self._file.write(b"\0" * (-self._file.tell() % _ALIGN))
        offset = self._file.tell()
        self._file.write(data)
        self._file.flush()
        self.bytes_written += len(data)
        return ir.ExternalTensor(self.path.name, offset, len(data), tensor.dtype, shape=tensor.shape,
                                 name=tensor.name, base_dir=self.dir)

    def close(self) -> None:
        self._finalizer()


def _remove(file, directory: Path) -> None:
    file.close()
    shutil.rmtree(directory, ignore_errors=True)


def attach_store(model: ir.Model, store: TensorStore | None) -> None:
    """Make passes on `model` (and on copies made from it later) spill new weights to `store`.
    The model keeps the store alive: its stored tensors live as long as the model does."""
    if store is None:
        model.graph.meta.pop(STORE_KEY, None)
    else:
        model.graph.meta[STORE_KEY] = store


def new_tensor(graph: ir.Graph, array: np.ndarray, name: str) -> ir.TensorProtocol:
    """A new weight of `graph`: in memory, or in the graph's TensorStore when it has one."""
    tensor = ir.Tensor(array, name=name)
    store = graph.meta.get(STORE_KEY)
    return store.put(tensor) if store is not None else tensor


def read_weight(tensor: ir.TensorProtocol, dtype=np.float32) -> np.ndarray:
    """A weight as an array of its own (`dtype`). An external (memory-mapped) tensor is unmapped
    again once read, so a pass that visits every layer holds one layer's weight at a time, not
    every page of the weight file it has touched (a later read maps it again)."""
    array = np.array(tensor.numpy(), dtype)  # a copy: nothing below may hold the mapping
    release(tensor)
    return array


def release(tensor: ir.TensorProtocol | None) -> None:
    """Drop an external tensor's memory mapping (it is mapped again when next read)."""
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:  # someone still holds a view of the mapping (an onnxruntime session): it stays
            pass


def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_TRIM = _malloc_trim()


def trim_heap() -> None:
    """Hand memory freed since (an onnxruntime session, a layer's temporaries) back to the system:
    glibc keeps it in its arenas, and the resident size with it (after calibrating MiniLM, 190 MB
    of 550). A no-op where the C library has no malloc_trim."""
    if _TRIM is not None:
        _TRIM(0)
