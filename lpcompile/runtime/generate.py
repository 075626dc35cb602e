"""Text generation over a compiled KV-cache step graph (`models/kv_llama.py` writes one).

The step graph takes `input_ids [1, S]` and, per layer, `past_key_{i}` / `past_value_{i}`
`[1, P, KV, D]`; it returns `logits [1, 1, vocab]` for the last new token and
`present_key_{i}` / `present_value_{i}` `[1, S, KV, D]` for the new tokens. One graph does the
prefill (S = prompt length, P = 0) and every decode step (S = 1).

The KV cache (`KVCache`) is one buffer per past input, `[1, capacity, KV, D]`, allocated once
(64-byte aligned) before the first step; `capacity` is the prompt plus the tokens to generate
(at most `max_context`). Position-major, so the first P positions are one contiguous block: each
step hands `buffer[:, :P]` to the runtime as it is (TVM through DLPack: no copy; the test checks
the address) and writes the S new positions into `buffer[:, P:P + S]` with a slice store. What is
copied per token is therefore the new token's keys/values only (2 x layers x KV x D floats) -
plus what the compiled graph itself does with the past: its attention transposes the past keys and
values into matmul operands (one read and one write of the past per layer and step), which a fused
attention kernel would avoid.

    gen = Generator(lpcompile.runtime.load("out/"))
    for token in gen.generate([1, 2, 3], max_new_tokens=32, temperature=0.8, top_k=40, seed=0):
        ...
    gen.stats        # prefill / decode seconds and tokens of the last call

`OrtStep` runs the same step graph (the artifact's `model.qdq.onnx`) in onnxruntime: the
reference that the compiled artifact's tokens are checked against.

This module imports numpy and (lazily) TVM's runtime or onnxruntime; never the compiler.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lpcompile.errors import LpcompileError

ALIGN = 64
_PAST = re.compile(r"past_(key|value)_(\d+)$")


class GenerationError(LpcompileError, ValueError):
    """The artifact is not a KV-cache step graph, or the request does not fit it."""


@dataclass(frozen=True)
class StepSignature:
    """What generation needs to know about a step graph, read from its input/output names."""

    ids: str
    past: tuple[str, ...]
    present: tuple[str, ...]
    logits: str
    kv_heads: int
    head_dim: int
    dtype: str

    @classmethod
    def from_io(cls, inputs: Sequence[dict], outputs: Sequence[dict]) -> "StepSignature":
        """`inputs`/`outputs`: [{"name", "shape", "dtype"}] as in an artifact's manifest."""
        names = [i["name"] for i in inputs]
        past = [i for i in inputs if _PAST.match(i["name"])]
        if "input_ids" not in names or not past:
            raise GenerationError("not a KV-cache step graph: it needs inputs input_ids and past_key_<i>/past_value_<i> "
                                  f"(it has {', '.join(names)}); export one with models/kv_llama.py")
        out_names = [o["name"] for o in outputs]
        present = [p["name"].replace("past_", "present_", 1) for p in past]
        missing = [n for n in ["logits", *present] if n not in out_names]
        if missing:
            raise GenerationError(f"not a KV-cache step graph: outputs {', '.join(missing)} are missing")
        shapes = {tuple(p["shape"][2:]) for p in past}
        if len(shapes) != 1 or any(len(p["shape"]) != 4 or p["shape"][0] != 1 for p in past) \
                or not all(isinstance(d, int) for d in next(iter(shapes))):
            raise GenerationError("past keys/values must all be [1, past, KV heads, head dim] with static KV and head dims")
        kv, d = next(iter(shapes))
        return cls("input_ids", tuple(p["name"] for p in past), tuple(present), "logits", kv, d, past[0]["dtype"])


class KVCache:
    """Preallocated keys/values: one aligned `[1, capacity, KV, D]` buffer per past input."""

    def __init__(self, sig: StepSignature, capacity: int):
        self.capacity = capacity
        self.length = 0
        self.buffers = [_aligned_empty((1, capacity, sig.kv_heads, sig.head_dim), sig.dtype) for _ in sig.past]

    def views(self) -> list[np.ndarray]:
        """The filled prefix of every buffer (views: no copy)."""
        return [b[:, : self.length] for b in self.buffers]

    def append(self, presents: Sequence[np.ndarray]) -> None:
        s = presents[0].shape[1]
        if self.length + s > self.capacity:
            raise GenerationError(f"the KV cache holds {self.capacity} positions; {self.length + s} needed")
        for buf, new in zip(self.buffers, presents):
            buf[:, self.length : self.length + s] = new  # the slice store: the only per-token write
        self.length += s

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)


def _aligned_empty(shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(n + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    out = raw[start : start + n].view(dtype).reshape(shape)
    out[...] = 0
    return out


class TvmStep:
    """One step of a compiled artifact (`lpcompile.runtime.load`), past views passed by DLPack."""

    def __init__(self, model):
        self.model = model
        m = model.manifest
        self.sig = StepSignature.from_io(m["inputs"], m["outputs"])
        order = {n: i for i, n in enumerate(model.input_names)}
        self._past_pos = [order[n] for n in self.sig.past]
        self._ids_pos = order[self.sig.ids]
        out = {n: i for i, n in enumerate(model.output_names)}
        self._logits_pos = out[self.sig.logits]
        self._present_pos = [out[n] for n in self.sig.present]
        self.last_inputs: list = []  # the TVM arrays of the last call (tests read their addresses)

    def __call__(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        from tvm.runtime import from_dlpack, tensor

        model = self.model
        arrays: list = [None] * len(model.input_names)
        arrays[self._ids_pos] = tensor(ids, model.device)
        for pos, view in zip(self._past_pos, past):
            aligned = view.ctypes.data % ALIGN == 0 and view.flags.c_contiguous
            arrays[pos] = from_dlpack(view) if aligned and not model.is_cuda else tensor(np.ascontiguousarray(view), model.device)
        self.last_inputs = arrays
        outs = model._invoke(arrays)
        return outs[self._logits_pos].numpy().reshape(-1), [outs[i].numpy() for i in self._present_pos]


class OrtStep:
    """One step of the same graph in onnxruntime (the artifact's `model.qdq.onnx` by default),
    with graph optimizations off unless `optimize`."""

    def __init__(self, path: str | Path, threads: int | None = None, optimize: bool = False):
        import onnxruntime as ort

        path = Path(path)
        if path.is_dir():
            path = path / "model.qdq.onnx"
        if not path.is_file():
            raise GenerationError(f"{path}: no such ONNX model")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        if not optimize:  # the reference: onnxruntime's defaults fuse int4 DQ+MatMul into MatMulNBits, which may
            # quantize the activations too (accuracy_level), i.e. compute another graph
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        io = lambda vs: [{"name": v.name, "shape": [d if isinstance(d, int) else str(d) for d in v.shape],  # noqa: E731
                          "dtype": {"tensor(float)": "float32", "tensor(int64)": "int64"}.get(v.type, v.type)} for v in vs]
        self.sig = StepSignature.from_io(io(self.session.get_inputs()), io(self.session.get_outputs()))
        self._outputs = [self.sig.logits, *self.sig.present]

    def __call__(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {self.sig.ids: ids, **dict(zip(self.sig.past, past))}
        logits, *presents = self.session.run(self._outputs, feeds)
        return logits.reshape(-1), presents


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    cache_write_s: float = 0.0  # the slice stores into the cache, decode steps only

    def summary(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.decode_tokens + (1 if self.prompt_tokens else 0),
            "time_to_first_token_ms": 1e3 * self.prefill_s,
            "prefill_tok_s": self.prompt_tokens / self.prefill_s if self.prefill_s else None,
            "decode_tok_s": self.decode_tokens / self.decode_s if self.decode_s else None,
            "decode_ms_per_token_p50": 1e3 * float(np.median(self.step_s)) if self.step_s else None,
            "cache_write_us_per_token": 1e6 * self.cache_write_s / self.decode_tokens if self.decode_tokens else None,
        }


def sample(logits: np.ndarray, rng: np.random.Generator | None, temperature: float, top_k: int | None) -> int:
    """Greedy (temperature 0) or a draw from softmax(logits / temperature) over the top_k."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k:
        keep = np.argpartition(z, -top_k)[-top_k:] if top_k < len(z) else np.arange(len(z))
    else:
        keep = np.arange(len(z))
    p = np.exp(z[keep] - z[keep].max())
    return int(keep[rng.choice(len(keep), p=p / p.sum())])


class Generator:
    """Generation over a step (`TvmStep`, `OrtStep`, or a loaded artifact, wrapped as a TvmStep)."""

    def __init__(self, step, max_context: int | None = None):
        self.step = step if hasattr(step, "sig") else TvmStep(step)  # a step, or a loaded artifact
        self.sig: StepSignature = self.step.sig
        self.max_context = max_context
        self.stats = GenerationStats()
        self.cache: KVCache | None = None
        self.logits: list[np.ndarray] = []  # per generated token, when keep_logits

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, seed: int | None = None, eos_id: int | None = None,
                 keep_logits: bool = False) -> Iterator[int]:
        """Yield up to `max_new_tokens` token ids, one as soon as it is chosen."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise GenerationError("the prompt needs at least one token id")
        if max_new_tokens < 1:
            raise GenerationError("max_new_tokens must be at least 1")
        if temperature < 0 or (top_k is not None and top_k < 1):
            raise GenerationError("temperature must be >= 0 and top_k >= 1")
        capacity = len(prompt) + max_new_tokens
        if self.max_context and capacity > self.max_context:
            raise GenerationError(f"prompt ({len(prompt)}) + new tokens ({max_new_tokens}) exceed the model's context "
                                  f"of {self.max_context}")
        rng = np.random.default_rng(seed)
        self.cache = cache = KVCache(self.sig, capacity)  # allocated once, before the first step
        self.stats = stats = GenerationStats(prompt_tokens=len(prompt))
        self.logits = []
        ids = np.array([prompt], np.int64)
        for i in range(max_new_tokens):
            t0 = time.perf_counter()
            logits, presents = self.step(ids, cache.views())
            t1 = time.perf_counter()
            cache.append(presents)
            if i:
                stats.cache_write_s += time.perf_counter() - t1
            token = sample(logits, rng, temperature, top_k)
            dt = time.perf_counter() - t0
            if i == 0:
                stats.prefill_s = dt
            else:
                stats.decode_s += dt
                stats.decode_tokens += 1
                stats.step_s.append(dt)
            if keep_logits:
                self.logits.append(logits.copy())
            yield token
            if eos_id is not None and token == eos_id:
                return
            ids = np.array([[token]], np.int64)


def parse_token_ids(text: str) -> list[int]:
    """"1,2,3" -> [1, 2, 3] (one clear error otherwise)."""
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise GenerationError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids or any(t < 0 for t in ids):
        raise GenerationError(f"--prompt-ids must be comma-separated non-negative integers, got {text!r}")
    return ids


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def bench_decode(model, prompt_len: int = 128, new_tokens: int = 64, repeat: int = 3, seed: int = 0) -> dict:
    """Greedy generation from a random prompt, `repeat` times after one warm-up: the median
    prefill tok/s, decode tok/s and time to first token, and the process's peak memory."""
    gen = Generator(model)
    vocab = None
    manifest = getattr(getattr(gen.step, "model", None), "manifest", None) or {}
    for o in manifest.get("outputs", []):
        if o["name"] == gen.sig.logits and isinstance(o["shape"][-1], int):
            vocab = o["shape"][-1]
    prompt = np.random.default_rng(seed).integers(0, vocab or 1000, prompt_len).tolist()
    runs = []
    for i in range(repeat + 1):
        for _ in gen.generate(prompt, new_tokens):
            pass
        if i:  # the first run warms up
            runs.append(gen.stats.summary())
    med = {k: float(np.median([r[k] for r in runs])) for k in ("prefill_tok_s", "decode_tok_s", "time_to_first_token_ms",
                                                               "decode_ms_per_token_p50", "cache_write_us_per_token")}
    return {**med, "prompt_tokens": prompt_len, "new_tokens": new_tokens, "repeat": repeat,
            "kv_cache_mb": gen.cache.nbytes / 2**20, "peak_rss_mb": peak_rss_mb()}
