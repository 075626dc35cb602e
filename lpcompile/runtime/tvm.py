"""Running a TVM artifact (`model.so` + `params.bin` + `manifest.json`) on the Relax VM.

Inputs are numpy arrays or torch tensors, by position or by input name. Contiguous, 64-byte aligned
arrays of the right dtype cross into TVM through DLPack without a copy (numpy and torch, CPU or CUDA);
anything else is converted first. Outputs come back as numpy arrays (torch tensors, through
DLPack, when the inputs were torch tensors).

This module imports TVM's runtime, numpy and the manifest; never lpcompile's compiler.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from lpcompile.errors import LpcompileError
from lpcompile.runtime.cpu import missing_features

LIBRARY = "model.so"
MANIFEST = "manifest.json"
ALIGN = 64  # TVM's DLPack import refuses less aligned data
# The manifest format this runtime reads (written by lpcompile.backends.tvm.export). 2: sha256 of
# the files loading reads, and the CPU features of the library.
MANIFEST_VERSION = 2


class ArtifactError(LpcompileError, ValueError):
    """The directory is not a loadable artifact, or the inputs do not fit it."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Files verified by this process, by identity and modification time: loading the same artifact
# again (a benchmark loop, a server's workers in one process) hashes it once.
_VERIFIED: dict[tuple, str] = {}


def _verify(path: Path, expected: str) -> None:
    st = path.stat()
    key = (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    digest = _VERIFIED.get(key) or sha256_file(path)
    if digest != expected:
        raise ArtifactError(f"{path}: checksum mismatch (the file is corrupted or was changed after it was "
                            "compiled); compile again")
    _VERIFIED[key] = digest


def _read_manifest(root: Path) -> dict:
    """The manifest, checked: a version this runtime reads, files present and intact, a CPU with
    the library's features."""
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{root}: no {MANIFEST} (not a TVM artifact; compile with --emit tvm)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    version = manifest.get("version") if isinstance(manifest, dict) else None
    if version != MANIFEST_VERSION:
        newer = isinstance(version, int) and version > MANIFEST_VERSION
        raise ArtifactError(f"{path}: manifest version {version!r}, this runtime reads version {MANIFEST_VERSION} "
                            + ("(upgrade lpcompile)" if newer else "(compile the model again)"))
    machine = manifest.get("machine")
    if machine and machine != platform.machine():  # a cross-compiled library cannot load here
        raise ArtifactError(f"{root}: compiled for {machine}; this machine is {platform.machine()}")
    cpu = manifest.get("cpu_features") or {}
    missing = missing_features(cpu.get("machine", ""), list(cpu.get("features", [])))
    if missing:
        raise ArtifactError(f"{root}: the library was compiled for CPU {cpu.get('cpu')} and uses "
                            f"{', '.join(missing)}, which this CPU lacks; compile it for this CPU (--target llvm)")
    sums = manifest.get("sha256") or {}
    needed = [manifest.get("library", LIBRARY)] + ([manifest.get("params", "params.bin")]
                                                  if manifest.get("param_names") else [])
    for name in dict.fromkeys([*needed, *sums]):
        if os.sep in name or name in ("", ".", ".."):
            raise ArtifactError(f"{path}: bad file name {name!r}")
        if not (root / name).is_file():
            raise ArtifactError(f"{root}: {name} is missing")
        if name not in sums:
            raise ArtifactError(f"{path}: no checksum for {name}")
        _verify(root / name, sums[name])
    return manifest


_CUDA_BINARIES: dict[str, bytes] = {}


def _serve_cuda_binaries(path: Path, entries: list[dict]) -> None:
    """TVM 0.27 compiles CUDA modules stored as source when they are loaded, through the global
    `tvm_callback_cuda_compile` (NVRTC by default). Answer it with the artifact's nvcc-built
    fatbins, matched by source hash; unknown sources go to the previous callback."""
    import hashlib

    import tvm_ffi

    for e in entries:
        _CUDA_BINARIES[e["source_sha256"]] = (path / e["file"]).read_bytes()
    name = "tvm_callback_cuda_compile"
    previous = tvm_ffi.get_global_func(name, allow_missing=True)
    if getattr(previous, "_lpcompile", False):
        return

    def serve(code, *rest):
        binary = _CUDA_BINARIES.get(hashlib.sha256(str(code).encode()).hexdigest())
        if binary is not None:
            return binary
        if previous is None:
            raise ArtifactError("a CUDA module without a prebuilt binary and no CUDA compiler callback")
        return previous(code, *rest)

    serve._lpcompile = True
    tvm_ffi.register_global_func(name, serve, override=True)


def _ensure_cuda_runtime() -> None:
    """TVM's CUDA device API lives in a side library (libtvm_runtime_cuda) that TVM registers
    only when its compiler is loaded too; a runtime-only deployment (TVM_USE_RUNTIME_LIB=1, or a
    runtime-only wheel) has to load it itself."""
    import tvm_ffi

    if tvm_ffi.get_global_func("device_api.cuda", allow_missing=True) is not None:
        return
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    lib_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[lib_dir], mode="RTLD_LOCAL")
    except (OSError, RuntimeError) as e:
        raise ArtifactError(f"TVM's CUDA runtime could not be loaded ({str(e).splitlines()[0]})") from None


def _check_gpu_arch(root: Path, binaries: list[dict], compute_version: str | None) -> None:
    """The fatbins are built for one SM arch: a GPU older than it cannot run them."""
    if not compute_version:
        return
    have = int(str(compute_version).replace(".", ""))
    for b in binaries:
        want = int(str(b.get("arch", "sm_0"))[3:].rstrip("a") or 0)
        if have < want:
            raise ArtifactError(f"{root}: compiled for {b['arch']}, this GPU is sm_{have}; compile for "
                                f"--target cuda:sm_{have}")


class TvmModel:
    """A compiled model: `model(*arrays)` / `model(name=array, ...)` / `model.run(feeds)`."""

    def __init__(self, out_dir, device=None):
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.path = Path(out_dir)
        self.manifest = _read_manifest(self.path)
        lib = self.path / self.manifest.get("library", LIBRARY)
        kind = device or self.manifest.get("device", "cpu")
        self.is_cuda = kind == "cuda"
        if self.is_cuda:
            _ensure_cuda_runtime()
        self.device = tvm.cuda(0) if self.is_cuda else tvm.cpu(0)
        if kind == "cuda" and not self.device.exist:
            raise ArtifactError(f"{self.path}: compiled for CUDA but no CUDA device is available")
        if self.is_cuda:
            _check_gpu_arch(self.path, self.manifest.get("cuda_binaries") or [], self.device.compute_version)
        self._tvm = tvm
        if self.is_cuda:
            _serve_cuda_binaries(self.path, self.manifest.get("cuda_binaries") or [])
        self._vm = VirtualMachine(tvm.runtime.load_module(str(lib)), self.device)
        self._main = self._vm["main"]
        params = self.path / self.manifest.get("params", "params.bin")
        names = self.manifest.get("param_names", [])
        loaded = tvm.runtime.load_param_dict_from_file(str(params)) if names else {}
        # loaded once onto the device; passed by reference on every call
        self._params = [loaded[n] if not self.is_cuda else loaded[n].copyto(self.device)
                        for n in names]
        self.input_names = [i["name"] for i in self.manifest["inputs"]]
        self.output_names = [o["name"] for o in self.manifest["outputs"]]

    def __repr__(self) -> str:
        return f"TvmModel({str(self.path)!r}, target={self.manifest.get('target')!r}, format={self.manifest.get('format')!r})"

    # --- inputs ---------------------------------------------------------------------------------

    def _feeds(self, args: tuple, kwargs: dict) -> list:
        if len(args) == 1 and isinstance(args[0], dict) and not kwargs:
            kwargs, args = args[0], ()
        if len(args) > len(self.input_names):
            raise ArtifactError(f"{len(args)} inputs given, the model takes {len(self.input_names)}")
        feeds = dict(zip(self.input_names, args))
        for name, value in kwargs.items():
            if name not in self.input_names:
                raise ArtifactError(f"unknown input {name!r}; inputs: {', '.join(self.input_names)}")
            if name in feeds:
                raise ArtifactError(f"input {name!r} given twice")
            feeds[name] = value
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ArtifactError(f"missing inputs: {', '.join(missing)}")
        return [self._to_tvm(feeds[spec["name"]], spec) for spec in self.manifest["inputs"]]

    def _to_tvm(self, value: Any, spec: dict):
        tvm = self._tvm
        dtype = spec["dtype"]
        if type(value).__module__.startswith("torch"):
            import torch

            want = getattr(torch, dtype)
            on_device = (value.device.type == "cuda") == self.is_cuda
            if value.dtype != want or not value.is_contiguous() or not on_device:
                value = value.to(dtype=want, device="cuda" if self.is_cuda else "cpu")
                value = value.contiguous()
            if value.data_ptr() % ALIGN:
                value = value.clone()  # TVM takes only 64-byte aligned memory
            arr = tvm.runtime.from_dlpack(value)  # no copy
        else:
            value = np.asarray(value)
            if value.dtype != np.dtype(dtype) or not value.flags.c_contiguous:
                value = np.ascontiguousarray(value, dtype=dtype)
            if not self.is_cuda and value.ctypes.data % ALIGN == 0:
                arr = tvm.runtime.from_dlpack(value)  # no copy
            else:
                arr = tvm.runtime.tensor(value, self.device)
        self._check_shape(arr.shape, spec)
        return arr

    @staticmethod
    def _check_shape(shape, spec) -> None:
        want = spec["shape"]
        if len(shape) != len(want) or any(isinstance(w, int) and w != s for w, s in zip(want, shape)):
            shown = ["?" if not isinstance(w, int) else w for w in want]
            raise ArtifactError(f"input {spec['name']!r}: shape {list(shape)} does not fit {shown}")

    # --- running ---------------------------------------------------------------------------------

    def _invoke(self, arrays: list):
        out = self._main(*arrays, *self._params)
        return list(out) if isinstance(out, (list, tuple)) or type(out).__name__ == "Array" else [out]

    def run(self, feeds: dict) -> dict[str, np.ndarray]:
        """Outputs by name, as numpy arrays."""
        outs = self._invoke(self._feeds((), dict(feeds)))
        return {name: o.numpy() for name, o in zip(self.output_names, outs)}

    def __call__(self, *args, **kwargs):
        """One output: an array; several: a dict by output name. numpy in, numpy out; torch in,
        torch out (DLPack, no copy)."""
        torch_in = any(type(v).__module__.startswith("torch") for v in (*args, *kwargs.values()))
        outs = self._invoke(self._feeds(args, kwargs))
        if torch_in:
            import torch

            conv = [torch.from_dlpack(o) for o in outs]
        else:
            conv = [o.numpy() for o in outs]
        return conv[0] if len(conv) == 1 else dict(zip(self.output_names, conv))

    # --- benchmarking ----------------------------------------------------------------------------

    def example_inputs(self, batch: int = 1, seq: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
        """Random inputs from the manifest: a symbolic dim first in an input is `batch`, any later
        one `seq`; integer inputs are token ids in [0, 1000) (masks: ones, type ids: zeros)."""
        rng = np.random.default_rng(seed)
        feeds = {}
        for spec in self.manifest["inputs"]:
            shape = [d if isinstance(d, int) else (batch if i == 0 else seq) for i, d in enumerate(spec["shape"])]
            dtype = np.dtype(spec["dtype"])
            name = spec["name"].lower()
            if dtype.kind == "f":
                feeds[spec["name"]] = rng.standard_normal(shape).astype(dtype)
            elif "mask" in name:
                feeds[spec["name"]] = np.ones(shape, dtype)
            elif "type" in name:
                feeds[spec["name"]] = np.zeros(shape, dtype)
            else:
                feeds[spec["name"]] = rng.integers(0, 1000, shape).astype(dtype)
        return feeds

    def benchmark(self, inputs: dict | None = None, warmup: int = 5, repeat: int = 50, batch: int = 1,
                  seq: int = 128) -> dict:
        """Latency of one call (inputs already on the device): p50/p90/p99/mean ms, and
        throughput in samples (the first dim of the first input) per second."""
        feeds = inputs if inputs is not None else self.example_inputs(batch, seq)
        arrays = self._feeds((), dict(feeds))
        for _ in range(warmup):
            self._invoke(arrays)
        self.device.sync()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            self._invoke(arrays)
            self.device.sync()
            times.append(time.perf_counter() - t0)
        ms = np.array(times) * 1e3
        samples = int(arrays[0].shape[0]) if arrays and len(arrays[0].shape) else 1
        return {
            "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()),
            "throughput_per_s": samples / float(np.median(times)),
            "batch": samples,
            "repeat": repeat,
            "input_shapes": {k: list(np.shape(v)) for k, v in feeds.items()},
        }

    def profile(self, inputs: dict | None = None, repeat: int = 10, batch: int = 1, seq: int = 128) -> dict:
        """Time per kernel and per op type over `repeat` runs (`runtime.profile`), with the input
        shapes."""
        from lpcompile.runtime.profile import profile_calls

        feeds = inputs if inputs is not None else self.example_inputs(batch, seq)
        arrays = self._feeds((), dict(feeds))
        result = profile_calls(lambda: self._invoke(arrays), repeat, self._vm.set_instrument, self.device.sync)
        return {"input_shapes": {k: list(np.shape(v)) for k, v in feeds.items()}, **result}
