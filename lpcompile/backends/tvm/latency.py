"""Kernel latency of linear layers on a target: measured once per kernel shape, cached on disk.

The select pass's latency cost. For a linear layer [M rows, K] x [K, N] in a (weights,
activations) format pair, `LatencyModel.layer_us` times what the lowering (`lower.linear._lower_linear`)
emits for that layer on the target:

- quantized weights: the same `quantized_matmul` kernel with the same layout choice (the dot4 /
  nibble layout where `lower.kernel_choice` picks it), built and scheduled by `kernels.build`,
  plus, where the input is quantized and a kernel takes it natively, the kernel quantizing the
  input (`quantize_rows` per token, `quantize_tensor` with a static scale);
- float weights ("keep"): a one-MatMul ONNX graph through the backend's own importer and
  pipeline (`lower.from_onnx`, `pipeline.build`), timed through the Relax VM.

A pair with no native kernel (a quantized input that no kernel takes as it is, asymmetric
weights) is not timed: `kernels_for` says why, and `layer_us` answers None. So do embedding
tables: a gather is not a matmul.

Rows. The lowering emits the one-row (GEMV) kernel only where a layer's row count is the constant
1; a symbolic row count (a model exported with dynamic batch / sequence) gets the GEMM kernel,
run here at `rows` rows. `LinearShape.static` says which of the two a layer has.

Timing: TVM's time_evaluator on the target's device, the median of `REPEATS` repeats of at
least `MIN_REPEAT_MS` each, after a warm-up call; the same buffers every call, so the weights are
warm in cache (what a model whose weights fit the last-level cache sees: all-MiniLM-L6-v2's
90 MB fp32 fit the 480 MiB of this host). Microseconds.

Cache: `latency.json` in $LPCOMPILE_CACHE (default ~/.cache/lpcompile), one entry per kernel,
keyed by the target (its JSON, CPU name included), the runtime thread count, the TVM version,
a hash of the backend's kernel sources (kernels/, lower/, pipeline.py and this file: a change
to any of them re-measures) and the kernel's signature. Written atomically, merged under a lock,
so concurrent compilers share it.

Targets whose code cannot run here (aarch64 cross-compiled on another machine, CUDA without a
GPU): `why_unmeasurable` (`lpcompile.targets.Target.timing_unavailable`) says so; nothing is estimated in their place. With a GPU present, CUDA
kernels are built through TVM's own path (`Executable.jit`, NVRTC), not the nvcc-built binaries
an artifact ships; that path has not run yet (the GPU machines here carry TVM's runtime only).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import tvm
from tvm import tirx

from lpcompile.backends.tvm import kernels as K
from lpcompile.backends.tvm.kernels.compute import ROW_CODES
from lpcompile.backends.tvm.target import describe, resolve
from lpcompile.errors import TargetError
from lpcompile.formats import PerBlock, PerTensor, PerToken, QuantSpec
from lpcompile.progress import Progress

CACHE_ENV = "LPCOMPILE_CACHE"
CACHE_FILE = "latency.json"
REPEATS = 5
MIN_REPEAT_MS = 10
_BACKEND = Path(__file__).resolve().parent
_SOURCES = (sorted((_BACKEND / "kernels").glob("*.py")) + sorted((_BACKEND / "lower").glob("*.py"))
            + [_BACKEND / n for n in ("pipeline.py", "latency.py")])

# The kernels' dtypes are the formats' dtype names (formats.dtype_name: TVM names dtypes as
# ml_dtypes does); which weights and static activations a kernel takes is the kernels' PAIRS table.
_WEIGHT_KINDS = frozenset(w for _, w in K.PAIRS)
_TENSOR_ACTS = frozenset(a for (a, _), pair in K.PAIRS.items() if pair.act_scale == "tensor")
_ROW_ACTS = tuple(ROW_CODES)  # PerTokenQDQ_int8 / _int4: codes carried in int8


@dataclass(frozen=True)
class LinearShape:
    """A linear layer's matmul: `rows` x `k` times `k` x `n`. `static`: the model's row count is
    the constant `rows` (else it is symbolic, and `rows` is the token count to time it at)."""

    rows: int
    k: int
    n: int
    static: bool = False


@dataclass(frozen=True)
class Kernel:
    """One kernel call the lowering emits: `kind` ("matmul", "quantize_rows", "quantize_tensor",
    "float_matmul") and its signature, which is also its cache key."""

    kind: str
    rows: int
    static: bool
    k: int
    n: int = 0
    weight: str = ""
    activation: str = "float32"
    block: int | None = None
    dot4: bool = False

    @property
    def signature(self) -> str:
        rows = f"{self.rows}{'' if self.static else '~m'}"
        parts = [self.kind, f"rows={rows}", f"k={self.k}", f"n={self.n}", f"w={self.weight}",
                 f"a={self.activation}", f"block={self.block or 'k'}"]
        return " ".join(parts) + (" dot4" if self.dot4 else "")


def why_unmeasurable(target: tvm.target.Target) -> str | None:
    """Why kernels for `target` cannot be timed on this machine, or None when they can (the
    target description's `timing_unavailable`: one answer for the API and this model)."""
    return describe(target).timing_unavailable()


def kernels_for(target: tvm.target.Target, shape: LinearShape, weights: QuantSpec | None,
                activations: QuantSpec | None) -> list[Kernel] | str:
    """The kernels the lowering emits for a linear layer in (weights, activations), or why it
    has no native kernel (a string). Mirrors `lower.linear._lower_linear` through `lower.kernel_choice`."""
    from lpcompile.backends.tvm.lower import kernel_choice

    rows, static, k, n = shape.rows, shape.static, shape.k, shape.n
    if weights is None:
        if activations is not None:
            return f"float weights with {activations.format.name} inputs have no kernel (quantize-dequantize, then float)"
        return [Kernel("float_matmul", rows, static, k, n)]
    kind = weights.format.dtype_name
    if kind not in _WEIGHT_KINDS:
        return f"no kernel for {weights.format.name} weights"
    if not weights.symmetric:
        return "asymmetric weights have no kernel (they run in float)"
    g = weights.granularity
    block = g.size if isinstance(g, PerBlock) and g.size < k else None
    act, quantize = None, []
    if activations is not None:
        fmt = activations.format.name
        if isinstance(activations.granularity, PerToken) and activations.dynamic and fmt in _ROW_ACTS:
            act = ("int8", "row")
            quantize = [Kernel("quantize_rows", rows, False, k, activation=fmt)]
        elif (isinstance(activations.granularity, PerTensor) and not activations.dynamic
              and activations.format.dtype_name in _TENSOR_ACTS):
            act = (activations.format.dtype_name, "tensor")
            quantize = [Kernel("quantize_tensor", rows, False, k, activation=act[0])]
        else:
            return f"no kernel takes {activations} inputs"
    one_row = static and rows == 1
    native, choice = kernel_choice(target, act, kind, k, n, block or k, rows=1 if one_row else None)
    if act is not None and not native:
        return f"no kernel multiplies {act[1]}-scaled {act[0]} inputs by {kind} weights"
    dot4 = choice.dot4
    matmul = Kernel("matmul", rows, one_row, k, n, kind, act[0] if act else "float32", block, dot4)
    return quantize + [matmul]


class LatencyModel:
    """Measured kernel latency for one target, with the on-disk cache (see the module docstring).

        model = LatencyModel("llvm")
        model.layer_us(LinearShape(1, 384, 1536), QuantSpec.parse("int4:block(0,128):sym"), None)
    """

    def __init__(self, target: str | tvm.target.Target, cache_dir: str | os.PathLike | None = None,
                 progress: Progress | None = None):
        self.target = resolve(target) if isinstance(target, str) else target
        self.reason = why_unmeasurable(self.target)
        self.progress = progress
        base = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lpcompile"
        self.path = Path(base) / CACHE_FILE
        threads = os.environ.get("TVM_NUM_THREADS") or str(len(os.sched_getaffinity(0)))
        self.prefix = (f"{json.dumps(dict(self.target.export()), sort_keys=True, default=str)} threads={threads} "
                       f"tvm={tvm.__version__} code={source_hash()}")
        self.built = 0  # kernels built and timed by this object (cache misses)
        self._entries: dict[str, dict] | None = None

    @property
    def measurable(self) -> bool:
        return self.reason is None

    def check(self) -> None:
        """Raise a one-line `TargetError` when this target's kernels cannot be timed here."""
        if self.reason is not None:
            raise TargetError(f"cannot measure kernel latency for target {self.target.kind.name}: {self.reason}")

    def layer_us(self, shape: LinearShape, weights: QuantSpec | None, activations: QuantSpec | None) -> float | None:
        """Microseconds of the layer's kernels, or None where it has no native kernel."""
        return self.table([(shape, weights, activations)])[(shape, _text(weights), _text(activations))]

    def table(self, requests: Iterable[tuple[LinearShape, QuantSpec | None, QuantSpec | None]]
              ) -> dict[tuple[LinearShape, str, str], float | None]:
        """`layer_us` of many layers, keyed (shape, str(weights), str(activations)) ("float" for
        None); kernels not in the cache are measured once each, with progress."""
        self.check()
        plans = {}
        for shape, w, a in requests:
            plans[(shape, _text(w), _text(a))] = kernels_for(self.target, shape, w, a)
        wanted = {k.signature: k for ks in plans.values() if not isinstance(ks, str) for k in ks}
        entries = self._load()
        missing = [k for sig, k in wanted.items() if self._key(sig) not in entries]
        measured = {}
        for i, kernel in enumerate(missing):
            measured[self._key(kernel.signature)] = self._measure(kernel)
            self.built += 1
            if self.progress:
                self.progress("latency: timing kernels", i + 1, len(missing))
        if measured:
            entries = self._store(measured)
        return {key: None if isinstance(ks, str) else sum(entries[self._key(k.signature)]["us"] for k in ks)
                for key, ks in plans.items()}

    # --- measuring -------------------------------------------------------------------------------

    def _measure(self, kernel: Kernel) -> dict:
        dev = tvm.cuda(0) if self.target.kind.name == "cuda" else tvm.cpu(0)
        start = time.perf_counter()
        if kernel.kind == "float_matmul":
            runnable, args = _float_matmul(kernel, self.target, dev)
        else:
            prim = _prim_func(kernel)
            runnable, args = K.build(prim, self.target).jit(), _random_args(prim, kernel.rows, dev)
        built = time.perf_counter() - start
        # (time_evaluator: one warm-up call, then repeats whose call count grows to MIN_REPEAT_MS)
        timer = runnable.time_evaluator("main", dev, number=1, repeat=REPEATS, min_repeat_ms=MIN_REPEAT_MS)
        runs = list(timer(*args).results)
        return {"us": float(np.median(runs)) * 1e6, "runs_us": [round(r * 1e6, 3) for r in runs],
                "build_seconds": round(built, 3), "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}

    # --- the cache -------------------------------------------------------------------------------

    def _key(self, signature: str) -> str:
        return f"{self.prefix} | {signature}"

    def _load(self) -> dict[str, dict]:
        if self._entries is None:
            self._entries = _read(self.path)
        return self._entries

    def _store(self, new: dict[str, dict]) -> dict[str, dict]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = {**_read(self.path), **new}  # what other processes wrote meanwhile is kept
            fd, tmp = tempfile.mkstemp(prefix=".latency.", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump({"version": 1, "entries": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        self._entries = entries
        return entries


def source_hash() -> str:
    """Hash of the backend sources a measurement depends on (12 hex digits)."""
    h = hashlib.sha256()
    for path in _SOURCES:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _read(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, OSError):
        return {}  # a damaged cache is measured again, not trusted
    entries = data.get("entries") if isinstance(data, dict) else None
    return entries if isinstance(entries, dict) else {}


def _text(spec: QuantSpec | None) -> str:
    return "float" if spec is None else str(spec)


def _prim_func(kernel: Kernel) -> tirx.PrimFunc:
    """The kernel as the lowering builds it (row count symbolic unless it is the constant 1)."""
    if kernel.kind == "quantize_rows":
        return K.quantize_rows(None, kernel.k, kernel.activation)
    if kernel.kind == "quantize_tensor":
        return K.quantize_tensor(None, kernel.k, kernel.activation)
    rows = 1 if kernel.static and kernel.rows == 1 else None
    return K.quantized_matmul(rows, kernel.k, kernel.n, weight=kernel.weight, activation=kernel.activation,
                              block_size=kernel.block, dot4=kernel.dot4)


def _random_args(func: tirx.PrimFunc, rows: int, dev) -> list:
    """Buffers for every parameter of `func` (symbolic extents = `rows`): random codes in range,
    scales of about 0.01 (no denormals), fp8 codes of normal numbers."""
    rng = np.random.default_rng(0)
    args = []
    for buf in func.params:
        shape = [int(d) if isinstance(d, tirx.IntImm) else rows for d in buf.shape]
        dtype = str(buf.dtype)
        if dtype in K.FLOAT8:
            a = rng.integers(0x20, 0x60, shape, dtype=np.uint8).view(getattr(ml_dtypes, dtype))
        elif dtype.startswith("float"):
            a = rng.uniform(0.01, 0.02, shape).astype(dtype)
        elif dtype.startswith(("int", "uint")):
            a = rng.integers(0, 8, shape).astype(dtype)
        else:
            raise TargetError(f"latency: no test data for a {dtype} parameter")
        args.append(tvm.runtime.tensor(a, dev))
    return args


def _float_matmul(kernel: Kernel, target: tvm.target.Target, dev):
    """A float layer as the backend compiles it: one ONNX MatMul with a constant [K, N] weight."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from lpcompile.backends.tvm.lower import from_onnx
    from lpcompile.backends.tvm.pipeline import build

    rows = kernel.rows if kernel.static else "m"
    w = np.random.default_rng(0).uniform(-0.05, 0.05, (kernel.k, kernel.n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="linear")], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, kernel.k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, kernel.n])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    mod, _ = from_onnx(model, target)
    vm = tvm.relax.VirtualMachine(build(mod, target), dev)
    x = tvm.runtime.tensor(np.random.default_rng(1).uniform(-1, 1, (kernel.rows, kernel.k)).astype(np.float32), dev)
    return vm, [x]


