"""Calibration data: where the sample inputs come from, checked against the model's inputs.

Accepted sources (`as_calibration_data`):
- an `.npz` file whose arrays are named after the model inputs, first axis = samples;
- a directory of such files (read one at a time, in name order);
- a Python iterable of dicts name -> array (each dict is one batch, first axis = samples);
- `"random:N"`: N random samples for a smoke run. It is labelled as such everywhere it shows:
  random inputs say nothing about the accuracy on real data.

Every batch is validated before any work: all model inputs present, at least one sample, numeric
dtypes that fit the model's (floats are not token ids), ranks and static dims match (named dims
agree between inputs), floats finite, token ids inside the table they index, and at least as many
samples as a static batch dimension asks for.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lpcompile.errors import CalibrationError

__all__ = ["CalibrationData", "InputSpec", "as_calibration_data", "model_input_specs"]


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]
    vocab: int | None = None  # integer ids that index an embedding table of this many rows


def model_input_specs(model: ir.Model) -> list[InputSpec]:
    specs = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        shape = tuple(d if isinstance(d, int) else (str(d) if d is not None else None) for d in (value.shape or ()))
        specs.append(InputSpec(value.name, np.dtype(dtype), shape, _gathered_vocab(value)))
    return specs


def _gathered_vocab(value: ir.Value) -> int | None:
    """Rows of the constant table that `value` indexes through Gather, if it does."""
    for use in value.uses():
        node = use.node
        if node.op_type == "Gather" and use.idx == 1 and node.inputs[0].const_value is not None:
            return int(node.inputs[0].const_value.shape[0])
    return None


@dataclass
class CalibrationData:
    """A re-iterable source of validated input batches."""

    specs: list[InputSpec]
    label: str
    is_random: bool = False
    _batches: list[dict[str, np.ndarray]] | None = None
    _files: list[Path] = field(default_factory=list)
    _random_n: int = 0
    seed: int = 0

    @property
    def fixed_batch(self) -> int | None:
        """The batch size a model with a static first dimension demands."""
        dims = {s.shape[0] for s in self.specs if s.shape and isinstance(s.shape[0], int)}
        return dims.pop() if len(dims) == 1 else None

    def batches(self, batch_size: int = 8) -> Iterator[dict[str, np.ndarray]]:
        """Batches of `batch_size` samples; for a model with a static batch dimension, batches
        of exactly that size (samples left over at the end of a block are skipped)."""
        fixed = self.fixed_batch
        size = fixed or batch_size
        for block in self._blocks():
            n = _num_samples(block)
            for start in range(0, n, size):
                if fixed and start + size > n:
                    break
                yield {k: v[start : start + size] for k, v in block.items()}

    @property
    def num_samples(self) -> int:
        return sum(_num_samples(b) for b in self._blocks())

    def _blocks(self) -> Iterator[dict[str, np.ndarray]]:
        if self._random_n:
            yield _random_block(self.specs, self._random_n, self.seed)
        elif self._files:
            for path in self._files:
                yield _validate(_read_npz(path), self.specs, str(path))
        else:
            yield from self._batches or []


def _num_samples(block: Mapping[str, np.ndarray]) -> int:
    return int(next(iter(block.values())).shape[0]) if block else 0


def as_calibration_data(source, model: ir.Model, seed: int = 0) -> CalibrationData:
    """Validated calibration data for `model` from any accepted source (see module docstring)."""
    specs = model_input_specs(model)
    if isinstance(source, CalibrationData):
        return source
    if source is None:
        raise CalibrationError("no calibration data given (use an .npz file, a directory of them, or random:N)")
    if isinstance(source, str) and source.startswith("random:"):
        m = re.fullmatch(r"random:(\d+)", source)
        if not m or int(m.group(1)) < 1:
            raise CalibrationError(f"bad calibration source {source!r}: expected random:N with N >= 1")
        n = int(m.group(1))
        data = CalibrationData(specs, f"random:{n} (smoke run: random inputs, not real data)", True, _random_n=n, seed=seed)
        _validate(next(data._blocks()), specs, source)  # fail now (e.g. fewer than a static batch), not mid-pass
        return data
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise CalibrationError(f"calibration data not found: {path}")
        files = sorted(path.glob("*.npz")) if path.is_dir() else [path]
        if not files:
            raise CalibrationError(f"no .npz files in calibration directory {path}")
        for f in files:  # validate everything up front; reading is cheap next to running the model
            _validate(_read_npz(f), specs, str(f))
        n = len(files)
        label = f"{path}" + (f" ({n} files)" if path.is_dir() else "")
        return CalibrationData(specs, label, _files=files)
    if isinstance(source, Mapping):
        source = [source]
    if isinstance(source, Iterable):
        batches = [_validate(dict(b), specs, f"batch {i}") for i, b in enumerate(source)]
        if not batches:
            raise CalibrationError("calibration data is empty")
        return CalibrationData(specs, f"{len(batches)} in-memory batches", _batches=batches)
    raise CalibrationError(f"cannot use {type(source).__name__} as calibration data")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise CalibrationError(f"calibration file {path} is a single array (.npy); give an .npz whose arrays "
                                   "are named after the model inputs (numpy.savez(path, name=array, ...))")
        with loaded as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CalibrationError(f"cannot read calibration file {path}: {reason}") from None


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensors
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _validate(block: dict, specs: list[InputSpec], where: str) -> dict[str, np.ndarray]:
    names = [s.name for s in specs]
    missing = [n for n in names if n not in block]
    if missing:
        have = ", ".join(sorted(block)) or "nothing"
        raise CalibrationError(f"{where}: missing model input(s) {', '.join(missing)} (it has {have})")
    out = {}
    n = None
    named: dict[str, tuple[int, str]] = {}  # a named dim's size, and the input that set it
    for spec in specs:
        arr = _to_numpy(block[spec.name])
        if arr.dtype.kind not in "biuf":
            raise CalibrationError(f"{where}: input {spec.name!r} is {arr.dtype}, not numbers; the model expects "
                                   f"{spec.dtype}")
        if arr.ndim and arr.shape[0] == 0:
            raise CalibrationError(f"{where}: input {spec.name!r} holds no samples (its first axis is 0)")
        if spec.shape and arr.ndim != len(spec.shape):
            raise CalibrationError(
                f"{where}: input {spec.name!r} has rank {arr.ndim}, the model expects {len(spec.shape)} "
                f"(first axis = samples)"
            )
        if spec.shape and isinstance(spec.shape[0], int) and arr.shape[0] < spec.shape[0]:
            raise CalibrationError(f"{where}: input {spec.name!r} has {arr.shape[0]} samples, fewer than the "
                                   f"model's static batch size {spec.shape[0]}")
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int) and axis > 0 and arr.shape[axis] != dim:
                raise CalibrationError(f"{where}: input {spec.name!r} has shape {arr.shape}, the model expects {spec.shape}")
            if isinstance(dim, str) and axis > 0:
                size, first = named.setdefault(dim, (arr.shape[axis], spec.name))
                if size != arr.shape[axis]:
                    raise CalibrationError(f"{where}: inputs {first!r} and {spec.name!r} disagree on dim {dim!r} "
                                           f"({size} vs {arr.shape[axis]})")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = "NaN" if np.isnan(arr).any() else "inf"
            raise CalibrationError(f"{where}: input {spec.name!r} holds {bad}")
        if arr.dtype != spec.dtype:
            if np.issubdtype(spec.dtype, np.integer) and not np.issubdtype(arr.dtype, np.integer):
                raise CalibrationError(f"{where}: input {spec.name!r} is {arr.dtype}, the model expects {spec.dtype}")
            arr = arr.astype(spec.dtype)
        if spec.vocab is not None and arr.size and (arr.min() < -spec.vocab or arr.max() >= spec.vocab):
            raise CalibrationError(f"{where}: input {spec.name!r} holds ids {int(arr.min())}..{int(arr.max())}; the "
                                   f"table it indexes has {spec.vocab} rows")
        if n is None:
            n = arr.shape[0] if arr.ndim else 1
        elif arr.ndim and arr.shape[0] != n:
            raise CalibrationError(f"{where}: inputs disagree on the number of samples ({n} vs {arr.shape[0]})")
        out[spec.name] = arr
    return out


def _random_block(specs: list[InputSpec], n: int, seed: int) -> dict[str, np.ndarray]:
    """Random inputs of the right types: token ids below the vocabulary, masks of ones, normal floats."""
    rng = np.random.default_rng(seed)
    block = {}
    for spec in specs:
        shape = [n] + [d if isinstance(d, int) else 16 for d in spec.shape[1:]]
        if np.issubdtype(spec.dtype, np.integer):
            if spec.vocab:
                block[spec.name] = rng.integers(0, spec.vocab, size=shape).astype(spec.dtype)
            else:  # masks, type ids: all ones is always a valid value
                block[spec.name] = np.ones(shape, spec.dtype)
        elif spec.dtype == np.bool_:
            block[spec.name] = np.ones(shape, np.bool_)
        else:
            block[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return block
