"""select: choose a format per linear layer under a goal. An analysis: the graph is not changed;
the result is a `Plan` (`lpcompile.plan`; model.meta["lpcompile.plan"]) that `Quantize` applies.

Three steps, each measured rather than guessed:

1. Sensitivity. For every layer and every candidate the pass measures
   - the *layer-local* error: SQNR of the layer's output x·W when only its weights (or only its
     input) are quantized, in numpy on input rows captured once from calibration data, and
   - the *end-to-end* error: the model output's noise-to-signal ratio (NSR = 1/SQNR) and cosine
     loss (1 - mean cosine per sample) when only that layer is quantized, in onnxruntime.
   No session is rebuilt per measurement: in one session every weight is an overridable input
   (an initializer that is also a graph input, so only the weight under test is fed); in one
   session per activation candidate every layer input passes `Where(selector, QDQ(x), x)` with a
   per-layer boolean selector input (default false: float). Each measurement is one batched
   run per calibration batch; the float reference outputs are computed once.
2. Cost. Weight bits per layer per candidate, including scales and zero points (exactly what the
   quantized initializers store); activation bits per element; formats the target cannot run
   natively are flagged "emulated" (or dropped, `allow_emulated=False`). Kernel latency is the
   backend's measurement on the target (`backends.tvm.latency`, cached per kernel shape), which
   the pass receives as data (`LatencyCosts`): microseconds of each layer's kernels per option
   at a given token count; options with no native kernel there have none and are not candidates
   under a latency budget; embedding tables (gathers, not matmuls) cost 0.
3. Solver (the goal's, `lpcompile.goals`, over `lpcompile.solver`). Small output errors of different layers add up (their noises are nearly
   independent), so the model's NSR is predicted by Σ NSR_i and its cosine loss by Σ loss_i.
   Choosing one option per layer to minimise Σ NSR_i subject to Σ bits_i <= budget is a
   multiple-choice knapsack, solved exactly by dynamic programming over costs rounded *up* to
   1/resolution of the budget (so the solution always meets the budget). A latency budget is the
   same knapsack over the layers' kernel microseconds (Σ µs_i <= budget, costs rounded up to
   budget/4096: at most one unit per layer is lost to rounding). `min_cosine` solves the dual:
   fewest bits with Σ loss_i <= 1 - C (the caller verifies on data and tightens).

FP8 exponent bits: per layer the local SQNR of the ExMy family (E2M5, E3M4, E4M3, E5M2; "FP8
Quantization: The Power of the Exponent") is measured for the weights (per-channel, absmax scale)
and the input (per-tensor, MSE clip); the deployable split (E4M3 or E5M2) with the better local
SQNR is the layer's FP8 candidate, and the plan records the best ExMy and the gap to it, next to
the input's outlier severity (kurtosis, largest/median channel max).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lpcompile.cache import read_json, write_json
from lpcompile.errors import LpcompileError, PassError
from lpcompile.formats import MIN_SCALE, PerChannel, PerTensor, QuantSpec, fp8_exmy
from lpcompile.goals import ACTIVATION_CANDIDATES, Goal, Problem
from lpcompile.ir.patterns import LinearLayer, find_linear_layers
from lpcompile.ir.run import OrtRunner
from lpcompile.metrics import cosine, nsr_to_db, sqnr_db as _sqnr_db
from lpcompile.passes.calibrate import CALIBRATION_KEY, Calibration
from lpcompile.passes.quantize import activation_scale, insert_activation_qdq
from lpcompile.passes.weight_quant import quantize_weight
from lpcompile.progress import Progress
from lpcompile.plan import PLAN_KEY, LayerChoice, Plan, parse_spec, spec_text, weight_bits

log = logging.getLogger(__name__)

WEIGHT_CANDIDATES = ("int4:block(0,128):sym", "int4:channel(1):sym", "int8:channel(1):sym",
                     "fp8_e4m3:channel(1):sym", "fp8_e5m2:channel(1):sym")
EMBEDDING_CANDIDATES = ("uint4:block(0,32):asym", "int8:channel(1):sym", "fp8_e4m3:channel(1):sym",
                        "fp8_e5m2:channel(1):sym")
EXMY = ((2, 5), (3, 4), (4, 3), (5, 2))
DEPLOYABLE_FP8 = ("fp8_e4m3", "fp8_e5m2")



def option_key(weights: QuantSpec | None, activations: QuantSpec | None) -> str:
    """How `LatencyCosts` names a layer's (weights, activations) option."""
    return f"{spec_text(weights)}|{spec_text(activations)}"


@dataclass(frozen=True)
class LatencyCosts:
    """Kernel latency per layer and option, as the backend measured it on the target.

    `per_layer[layer name][option_key(w, a)]`: microseconds of the layer's kernels (its matmul,
    and the kernel quantizing its input where that is quantized) at `tokens` rows; an option
    absent has no native kernel on `target` (not a candidate under a latency budget). A layer
    absent (an embedding table: a gather) costs nothing."""

    per_layer: Mapping[str, Mapping[str, float]]
    tokens: int = 1
    target: str = ""
    note: str = ""

    def of(self, name: str, weights: QuantSpec | None, activations: QuantSpec | None) -> float | None:
        return (self.per_layer.get(name) or {}).get(option_key(weights, activations))


# --- numerics of the candidates, in numpy -----------------------------------------------------------


def fake_quantize_activation(x: np.ndarray, spec: QuantSpec, stats) -> np.ndarray:
    """`x` (rows of the last axis) through `spec` as the QDQ graph computes it: dynamic per-token
    scales from each row's max, static ones from calibration (`stats`: TensorStats)."""
    fmt = spec.format
    if spec.dynamic:
        scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / fmt.max_finite, MIN_SCALE)
        return fmt.quantize(x / scale) * scale
    scale, zp = activation_scale(stats, spec)
    if zp:
        return (np.clip(np.rint(x / scale) + zp, fmt.qmin, fmt.qmax) - zp) * scale
    return fmt.quantize(x / scale) * scale




@dataclass
class _OutputError:
    signal: float = 0.0
    noise: float = 0.0
    cos_sum: float = 0.0
    samples: int = 0

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        r = ref.astype(np.float64).reshape(ref.shape[0], -1)
        g = got.astype(np.float64).reshape(r.shape)
        self.signal += float((r**2).sum())
        self.noise += float(((r - g) ** 2).sum())
        self.cos_sum += float(cosine(r, g).sum())
        self.samples += r.shape[0]

    def result(self) -> dict:
        nsr = self.noise / self.signal if self.signal > 0 else 0.0
        return {"nsr": nsr, "cosine_loss": max(0.0, 1.0 - self.cos_sum / max(self.samples, 1)),
                "sqnr_db": nsr_to_db(nsr)}


# --- the pass ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Select(ir.passes.InPlacePass):
    """Measure every layer's sensitivity to each candidate and choose a format per layer.

    `goal` (`lpcompile.goals`: Bits, Bytes, Latency, MinCosine, or a user's own) picks one option
    per layer from the measured `Problem`. `latency`: the backend's measurements
    (`LatencyCosts`); needed by goals that `needs_latency`, reported with any goal. `data`:
    calibration batches (what `CalibrationData.batches` yields), of which the first `samples`
    samples are used; `Calibrate` must have run (static activation scales). `activations`: the
    input formats a plan may use (None = float; default: what the goal considers); the
    `analysis_activations` are measured and reported for every layer either way. `emulated`:
    format names the target runs only by dequantizing to float (flagged in the plan; dropped if
    not `allow_emulated`). `plan`: a previous or hand-edited plan whose pins are respected (and
    whose measurements are reused when they were taken the same way). Writes
    `model.meta["lpcompile.plan"]`.
    """

    data: object
    goal: Goal
    latency: LatencyCosts | None = None
    samples: int = 32
    batch_size: int = 16
    rows: int = 2048
    weights: tuple[str, ...] = WEIGHT_CANDIDATES
    embeddings: tuple[str, ...] = EMBEDDING_CANDIDATES
    activations: tuple[str | None, ...] | None = None
    analysis_activations: tuple[str, ...] = ACTIVATION_CANDIDATES
    method: str = "gptq"
    emulated: frozenset[str] = frozenset()
    allow_emulated: bool = True
    plan: Plan | None = None
    rotation: str = "none"
    progress: Progress | None = None
    cache: bool = False  # keep measurements in lpcompile.cache (a rerun with another goal measures nothing)

    def __post_init__(self):
        if not isinstance(self.goal, Goal):
            raise LpcompileError(f"select needs a goal (lpcompile.goals: Bits, Bytes, Latency, MinCosine), "
                                 f"got {self.goal!r}")
        if self.activations is None:
            object.__setattr__(self, "activations", tuple(self.goal.activation_candidates()))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        start = time.perf_counter()
        calibration: Calibration | None = model.meta.get(CALIBRATION_KEY)
        if calibration is None:
            raise PassError("select needs calibration statistics: run Calibrate first")
        layers = find_linear_layers(model.graph)
        if not layers:
            raise PassError("select: the model has no linear layers")
        if self.goal.needs_latency and self.latency is None:
            raise PassError(f"select: the goal {self.goal} needs the backend's kernel latencies (Select.latency)")
        self.goal.check_feasible(self.problem(layers))  # before minutes of measuring
        key = self.measurement_key(layers, calibration)
        cached = bool(self.plan is not None and self.plan.sensitivity and self.plan.sensitivity.get("@key") == key)
        sens = self.plan.sensitivity if cached else None
        entry = None
        if sens is None and self.cache:
            entry = f"select-{_fingerprint(model, key, _take(self.data, self.samples, self.batch_size))}.json"
            hit = read_json(entry)
            if hit is not None and hit.get("@key") == json.loads(json.dumps(key)):
                sens, cached = hit, True
        if sens is None:
            sens = {"@key": key, **measure_sensitivity(model, layers, calibration, self)}
            if entry is not None:
                write_json(entry, sens)
        plan = self.solve(layers, sens)
        plan.totals["select_seconds"] = round(time.perf_counter() - start, 3)
        plan.totals["sensitivity_cached"] = bool(cached)
        model.meta[PLAN_KEY] = plan
        log.info("select: %d layers, %.4f bits per weight, predicted output SQNR %.2f dB (%s)", len(plan.layers),
                 plan.totals["avg_weight_bits"], plan.totals["predicted_sqnr_db"],
                 "measurements reused" if cached else f"measured in {plan.totals['select_seconds']:.1f} s")
        return ir.passes.PassResult(model, modified=False)

    def measurement_key(self, layers: Sequence[LinearLayer], calibration: Calibration) -> dict:
        """What the measurements depend on; a plan whose sensitivity carries the same key is reused
        instead of measured again (the cache lives in plan.json)."""
        return {"layers": [[l.name, l.in_features, l.out_features] for l in layers], "rotation": self.rotation,
                "calibration": calibration.source, "samples": self.samples, "rows": self.rows,
                "method": self.method, "weights": list(self.weights), "embeddings": list(self.embeddings),
                "activations": list(self.analysis_activations) + [
                    str(a) for a in self.activations if a is not None and str(a) not in self.analysis_activations]}

    # --- solving -------------------------------------------------------------------------------

    def options(self, layer: LinearLayer, s: dict | None) -> list[tuple[QuantSpec | None, QuantSpec | None]]:
        """The (weights, activations) pairs this layer may take; with `s` None (no sensitivity
        measured yet) every pair it might take, e.g. to measure their latency beforehand. Under a
        latency budget, only pairs with a measured latency."""
        if self.plan is not None and (pin := self.plan.pinned_choice(layer.name)) is not None:
            return [(pin[0], pin[1])]
        listed = s["weights"] if s is not None else (self.embeddings if layer.kind == "embedding" else self.weights)
        weights = [parse_spec(w) for w in listed] + [None]
        weights = [w for w in weights if w is None or self._allowed(w)]
        if layer.kind == "embedding" or layer.activation is None:
            return [(w, None) for w in weights]
        acts = [parse_spec(a) if isinstance(a, str) else a for a in self.activations]
        acts = [a for a in acts if a is None or self._allowed(a)]
        fp8 = s.get("fp8_activation") if s is not None else None
        # FP8 activations: only the split this layer's outliers call for (see `exmy`).
        acts = [a for a in acts if a is None or a.format.name not in DEPLOYABLE_FP8 or fp8 is None or a.format.name == fp8]
        pairs = [(w, a) for w in weights for a in acts]
        if self.goal.needs_latency and s is not None:
            pairs = [(w, a) for w, a in pairs if self.latency.of(layer.name, w, a) is not None]
        return pairs

    def _allowed(self, spec: QuantSpec) -> bool:
        return self.allow_emulated or spec.format.name not in self.emulated

    def problem(self, layers: Sequence[LinearLayer], sens: dict[str, dict] | None = None) -> Problem:
        """What the goal chooses from: each layer's options with their weight bits, and with
        `sens` (the measurements) their predicted errors and, where the goal needs them, kernel
        latencies. Without `sens`, the costs alone: enough to refuse an unreachable budget
        before measuring anything."""
        groups, costs, nsr, loss, micros = [], [], [], [], []
        for layer in layers:
            s = sens[layer.name] if sens is not None else None
            opts = self.options(layer, s)
            if not opts:  # (only a latency budget drops options)
                raise LpcompileError(f"layer {layer.name}: no candidate format has a native kernel, so a measured "
                                     f"latency, on {self.latency.target or 'the target'}")
            groups.append(opts)
            k, n = s["shape"] if s is not None else (layer.in_features, layer.out_features)
            costs.append([weight_bits(w, k, n) for w, _ in opts])
            if s is None:
                continue
            nsr.append([_e2e(s, w, a, "nsr") for w, a in opts])
            loss.append([_e2e(s, w, a, "cosine_loss") for w, a in opts])
            if self.goal.needs_latency:
                if layer.kind == "embedding":  # a gather: no matmul kernel, not part of the budget
                    micros.append([0.0] * len(opts))
                elif any(self.latency.of(layer.name, w, a) is None for w, a in opts):  # only a pin gets here
                    raise LpcompileError(f"layer {layer.name}: its pinned format has no native kernel on "
                                         f"{self.latency.target or 'the target'}, so no latency to budget")
                else:
                    micros.append([self.latency.of(layer.name, w, a) for w, a in opts])
        measured = sens is not None
        return Problem([l.name for l in layers], [l.kind for l in layers], groups, costs,
                       nsr if measured else None, loss if measured else None,
                       micros if measured and self.goal.needs_latency else None,
                       sum(l.in_features * l.out_features for l in layers))

    def solve(self, layers: Sequence[LinearLayer], sens: dict[str, dict]) -> Plan:
        problem = self.problem(layers, sens)
        choice = self.goal.solve(problem)
        budget = self.goal.budget()
        groups, costs, nsr, loss = problem.options, problem.bits, problem.nsr, problem.cosine_loss
        chosen, unmeasured = [], []
        counted = problem.latency_us if problem.latency_us is not None else costs  # what the reasons compare
        for layer, opts, j, c_, e_, l_, r_ in zip(layers, groups, choice, costs, nsr, loss, counted):
            w, a = opts[j]
            s = sens[layer.name]
            pin = self.plan.pinned_choice(layer.name) if self.plan is not None else None
            method = pin[2] if pin is not None else (self.method if w is not None else "mse")
            if not _measured(s, w, a):
                unmeasured.append(layer.name)
            chosen.append(LayerChoice(
                layer.name, w, a, method, self.rotation, self._reason(layer, s, opts, j, r_, e_),
                tuple(s["shape"]), int(c_[j]), {"nsr": e_[j], "cosine_loss": l_[j]}, pinned=pin is not None))
        bits = sum(c.bits for c in chosen)
        params = sum(c.shape[0] * c.shape[1] for c in chosen)
        pred_nsr = sum(c.predicted["nsr"] for c in chosen)
        totals = {"params": params, "weight_bits": bits, "avg_weight_bits": bits / params if params else 0.0,
                  "weight_bytes": bits / 8, "predicted_nsr": pred_nsr,
                  "predicted_sqnr_db": nsr_to_db(pred_nsr),
                  "predicted_cosine": 1.0 - sum(c.predicted["cosine_loss"] for c in chosen),
                  "activation_bits_per_token": sum(
                      (c.activations.format.bits if c.activations else 32) * sens[c.name]["shape"][0]
                      for c in chosen if sens[c.name]["kind"] != "embedding"),
                  "unmeasured_pins": unmeasured}  # pinned to a format not among the candidates: counted as 0
        plan = Plan(chosen, budget, totals, dict(self.plan.pins) if self.plan else {}, sens)
        if self.latency is not None:
            plan.set_latency(self.latency, frozenset(l.name for l in layers if l.kind == "embedding"))
        return plan

    def _reason(self, layer, s, opts, j, costs, errors) -> str:
        w, a = opts[j]
        if len(opts) == 1:
            return "pinned by the user"
        parts = []
        cheaper = [i for i in range(len(opts)) if costs[i] < costs[j]]
        faster = "faster " if self.goal.needs_latency else ""
        if cheaper:
            i = min(cheaper, key=lambda i: errors[i])
            name = option_key(*opts[i]).replace("|", " x ") if opts[i][1] is not None else spec_text(opts[i][0])
            if errors[j] > 0:
                parts.append(f"{faster}{name} would add {errors[i] / errors[j]:.1f}x its output noise")
            else:
                parts.append(f"{faster}{name} would add output noise (this adds none)")
        else:
            parts.append("fastest option" if faster else "cheapest option")
        if w is not None and w.format.name in self.emulated or a is not None and a.format.name in self.emulated:
            parts.append("emulated on this target")
        out = s.get("outliers") or {}
        if out.get("max_to_median") is not None:
            parts.append(f"input max/median {out['max_to_median']:.1f}")
        return "; ".join(parts)


def _e2e(s: dict, w: QuantSpec | None, a: QuantSpec | None, key: str) -> float:
    """Predicted output error of a (weights, activations) pair: the two measured errors added (a
    format that was not measured, which only a pin can bring, counts 0)."""
    total = 0.0
    if w is not None:
        total += s["e2e_weights"].get(str(w), {}).get(key, 0.0)
    if a is not None:
        total += s["e2e_activations"].get(str(a), {}).get(key, 0.0)
    return total


def _measured(s: dict, w: QuantSpec | None, a: QuantSpec | None) -> bool:
    return (w is None or str(w) in s["e2e_weights"]) and (a is None or str(a) in s["e2e_activations"])


# --- measuring ------------------------------------------------------------------------------------


def measure_sensitivity(model: ir.Model, layers: Sequence[LinearLayer], calibration: Calibration,
                        cfg: Select) -> dict[str, dict]:
    """Per layer name: shape, parameters, local and end-to-end errors of every candidate, the
    ExMy analysis and the input's outlier severity (see the module docstring)."""
    batches = _take(cfg.data, cfg.samples, cfg.batch_size)
    if not batches:
        raise PassError("select: the calibration data yielded no batches")
    acts = [QuantSpec.parse(a) for a in cfg.analysis_activations]
    acts += [a if isinstance(a, QuantSpec) else QuantSpec.parse(a) for a in cfg.activations
             if a is not None and str(a) not in {str(x) for x in acts}]
    start = time.perf_counter()
    captured = _capture_inputs(model, layers, batches, cfg.rows)
    sens: dict[str, dict] = {}
    weight_q: dict[tuple[str, str], np.ndarray] = {}
    for done, layer in enumerate(layers):
        w = _canonical_weight(layer)
        k, n = w.shape
        s = {"kind": layer.kind, "shape": [k, n], "params": k * n,
             "weights": list(cfg.embeddings if layer.kind == "embedding" else cfg.weights)}
        x = captured.get(layer.name)
        st = calibration.stats.get(layer.activation.name) if layer.activation is not None else None
        gram = st.gram if st is not None else None  # GPTQ where Calibrate recorded XᵀX, as Quantize will
        s["local_weights"] = {}
        for spec_s in s["weights"]:
            spec = QuantSpec.parse(spec_s)
            wq = quantize_weight(w, spec, cfg.method, gram).dequantize().astype(np.float32)
            weight_q[(layer.name, str(spec))] = np.ascontiguousarray(wq.T if layer.transposed else wq)
            s["local_weights"][str(spec)] = _local_sqnr(layer, x, w, wq)
        if layer.kind != "embedding" and x is not None:
            ref = x @ w
            s["local_activations"] = {str(a): _sqnr_db(ref, fake_quantize_activation(x, a, st) @ w) for a in acts
                                      if st is not None or a.dynamic}
            s["exmy"] = _exmy(w, x, st)
            s["outliers"] = _outliers(st, x)
            best = max(DEPLOYABLE_FP8, key=lambda f: s["exmy"]["activations_db"][_exmy_name(f)])
            s["fp8_activation"] = best
            wbest = max(DEPLOYABLE_FP8, key=lambda f: s["exmy"]["weights_db"][_exmy_name(f)])
            s["weights"] = [t for t in s["weights"] if QuantSpec.parse(t).format.name not in DEPLOYABLE_FP8
                            or QuantSpec.parse(t).format.name == wbest]
        sens[layer.name] = s
        if cfg.progress:
            cfg.progress("select: layer-local", done + 1, len(layers))
    local = time.perf_counter()
    _end_to_end(model, layers, calibration, batches, acts, weight_q, sens, cfg.progress)
    sens["@seconds"] = {"local": round(local - start, 2), "end_to_end": round(time.perf_counter() - local, 2),
                       "samples": sum(len(next(iter(b.values()))) for b in batches)}
    return sens


def _fingerprint(model: ir.Model, key: dict, batches) -> str:
    """What select's measurements depend on, hashed: the graph (ops, wiring, attributes), every
    initializer's bytes (read one at a time), the calibration samples measured on, and `key`."""
    h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode())
    for node in model.graph:
        h.update(f"{node.domain}::{node.op_type}({[v.name if v else '' for v in node.inputs]})->"
                 f"{[v.name for v in node.outputs]}{sorted((k, str(a)) for k, a in node.attributes.items())}".encode())
    for name, value in sorted(model.graph.initializers.items()):
        h.update(name.encode())
        if value.const_value is not None:
            h.update(value.const_value.tobytes())
    for batch in batches:
        for name in sorted(batch):
            a = np.ascontiguousarray(batch[name])
            h.update(f"{name}{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()[:32]


def _exmy_name(fmt_name: str) -> str:
    return {"fp8_e4m3": "e4m3", "fp8_e5m2": "e5m2"}[fmt_name]


def _take(data, samples: int, batch_size: int) -> list[dict[str, np.ndarray]]:
    """About `samples` samples of `data` as batches, spread evenly over all its batches (a
    directory of length buckets must not give only the shortest), kept: every measurement
    reuses them."""
    source = data.batches(batch_size) if hasattr(data, "batches") else data
    every = [dict(b) for b in source]
    sizes = [len(next(iter(b.values()))) for b in every]
    if sum(sizes) <= samples:
        return every
    want = max(1, round(len(every) * samples / sum(sizes)))
    picks = np.unique(np.linspace(0, len(every) - 1, want).round().astype(int))
    return [every[i] for i in picks]


def _canonical_weight(layer: LinearLayer) -> np.ndarray:
    stored = layer.weight.const_value.numpy().astype(np.float32)
    return stored.T if layer.transposed else stored


def _capture_inputs(model: ir.Model, layers: Sequence[LinearLayer], batches, rows: int) -> dict[str, np.ndarray]:
    """Per layer, up to `rows` rows of its float input (a fixed random subset of all rows seen);
    for embeddings, the rows of the table that the calibration ids look up (as one-hot inputs
    they would be: the local error of a table is the error of the rows actually used)."""
    names = {}
    for layer in layers:
        if layer.kind == "embedding":
            names[layer.name] = layer.node.inputs[1].name
        elif layer.activation is not None:
            names[layer.name] = layer.activation.name
    runner = OrtRunner(model, extra=sorted(set(names.values())))
    seen: dict[str, list[np.ndarray]] = {v: [] for v in set(names.values())}
    for batch in batches:
        out = {**batch, **runner.run(batch)}
        for v in seen:
            a = out[v]
            seen[v].append(a.reshape(-1) if np.issubdtype(a.dtype, np.integer) else a.reshape(-1, a.shape[-1]))
    rng = np.random.default_rng(0)
    captured = {}
    for name, v in names.items():
        a = np.concatenate(seen[v])
        if len(a) > rows:
            a = a[np.sort(rng.choice(len(a), rows, replace=False))]
        captured[name] = a.astype(np.float32) if a.dtype.kind == "f" else a
    return captured


def _local_sqnr(layer: LinearLayer, x: np.ndarray | None, w: np.ndarray, wq: np.ndarray) -> float:
    if layer.kind == "embedding":  # canonical [D, V]: the used rows are columns
        ids = x if x is not None else np.arange(w.shape[1])
        return _sqnr_db(w[:, ids], wq[:, ids])
    if x is None:
        return _sqnr_db(w, wq)
    return _sqnr_db(x @ w, x @ wq)


def _exmy(w: np.ndarray, x: np.ndarray, st) -> dict:
    """Local SQNR (dB) of the ExMy formats for the weights (per-channel, absmax scale) and the input
    (per-tensor, MSE clip from the calibration histogram); the deployable E4M3FN/E5M2 too."""
    from lpcompile.formats import FP8_E4M3, FP8_E5M2

    ref = x @ w
    out = {"weights_db": {}, "activations_db": {}}
    formats = [(f"e{e}m{m}", fp8_exmy(e, m)) for e, m in EXMY]
    for name, fmt in formats + [("e4m3fn", FP8_E4M3), ("e5m2-ieee", FP8_E5M2)]:
        wspec = QuantSpec(fmt, PerChannel(1), True)
        wq = quantize_weight(w, wspec, "rtn").dequantize()
        out["weights_db"][name] = _sqnr_db(ref, x @ wq)
        if st is not None:
            aspec = QuantSpec(fmt, PerTensor(), True, scale_method="mse")
            out["activations_db"][name] = _sqnr_db(ref, fake_quantize_activation(x, aspec, st) @ w)
    # The deployable names map onto what ONNX runs: E4M3FN and IEEE E5M2.
    for side in ("weights_db", "activations_db"):
        d = out[side]
        if d:
            d["e4m3"], d["e5m2"] = d.pop("e4m3fn"), d.pop("e5m2-ieee")
            exmy_only = {k: v for k, v in d.items() if k in {f"e{e}m{m}" for e, m in EXMY}}
            best = max(exmy_only, key=exmy_only.get)
            deploy = max(("e4m3", "e5m2"), key=d.get)
            out[side.replace("_db", "_best")] = {"exmy": best, "deployable": deploy,
                                                 "gap_db": exmy_only[best] - d[deploy]}
    return out


def _outliers(st, x: np.ndarray) -> dict:
    """Outlier severity of a layer input: kurtosis of its values and largest/median channel max
    (from the captured rows and the calibration per-channel max)."""
    x64 = x.astype(np.float64)
    mu, var = x64.mean(), x64.var()
    kurt = float(((x64 - mu) ** 4).mean() / var**2) if var > 0 else float("nan")
    cmax = st.channel_absmax if st is not None and st.channel_absmax is not None else np.abs(x).max(axis=0)
    med = float(np.median(cmax))
    return {"kurtosis": kurt, "max_to_median": float(cmax.max() / med) if med > 0 else float("inf")}


def _end_to_end(model, layers, calibration, batches, acts, weight_q, sens, progress) -> None:
    """Fill `e2e_weights` / `e2e_activations` of every layer: output error with only that layer
    (weights, or input) quantized, on `batches`. Weights: one session of the float model with
    overridable weights. Activations: one session per candidate spec, in which every layer input
    has that spec's QDQ behind a `Where` switched by the layer's selector (only one QDQ per input:
    onnxruntime evaluates both branches of a Where)."""
    jobs = []  # (result dict, key, session index, extra feeds)
    sessions = [_sensitivity_model(model, layers, calibration, None)]
    for layer in layers:
        s = sens[layer.name]
        s["e2e_weights"], s["e2e_activations"] = {}, {}
        for spec_s in s["weights"]:
            spec = str(QuantSpec.parse(spec_s))
            jobs.append((s["e2e_weights"], spec, 0, {sessions[0][1][layer.name]: weight_q[(layer.name, spec)]}))
    for a in acts:
        probe, _, selectors = _sensitivity_model(model, layers, calibration, a)
        if not selectors:
            continue
        sessions.append((probe, {}, selectors))
        for layer in layers:
            if layer.name in selectors and "local_activations" in sens[layer.name]:
                jobs.append((sens[layer.name]["e2e_activations"], str(a), len(sessions) - 1,
                             {selectors[layer.name]: np.array(True)}))
    runners = [OrtRunner(probe) for probe, _, _ in sessions]
    out_name = runners[0].session.get_outputs()[0].name
    feeds = [{k: v for k, v in b.items() if k in runners[0].input_names} for b in batches]
    reference = [runners[0].session.run([out_name], f)[0] for f in feeds]
    for i, (target, key, which, extra) in enumerate(jobs):
        err = _OutputError()
        for f, ref in zip(feeds, reference):
            err.add(ref, runners[which].session.run([out_name], {**f, **extra})[0])
        target[key] = err.result()
        if progress:
            progress("select: end-to-end", i + 1, len(jobs))


def _sensitivity_model(model, layers, calibration, spec: QuantSpec | None):
    """A copy of `model` for end-to-end sensitivity. `spec` None: each layer's weight becomes an
    overridable input (an initializer that is also a graph input; its own copy where layers
    share one). Else each layer input passes `Where(selector, QDQ_spec(x), x)`, the selector an
    overridable int64 scalar (default 0 = float). Returns (model, layer -> weight input,
    layer -> selector name)."""
    from lpcompile.ir import upgrade_opset
    from lpcompile.passes.quantize import QDQ_OPSET

    probe = ir.from_proto(ir.to_proto(model))
    upgrade_opset(probe, QDQ_OPSET)
    graph = probe.graph
    probe_layers = {l.name: l for l in find_linear_layers(graph)}
    weight_inputs, selectors = {}, {}
    used_weights: set[str] = set()
    qdq_cache: dict[str, ir.Value] = {}
    for i, name in enumerate(l.name for l in layers):
        layer = probe_layers[name]
        if spec is None:
            w = layer.weight
            if w.name in used_weights or w.is_graph_input():
                copy = ir.Value(name=f"{w.name}__select{i}", const_value=w.const_value)
                copy.dtype, copy.shape = w.dtype, w.shape
                graph.register_initializer(copy)
                layer.node.replace_input_with(0 if layer.kind == "embedding" else 1, copy)
                w = copy
            used_weights.add(w.name)
            w.dtype = w.dtype or w.const_value.dtype  # a graph input needs its type spelled out
            w.shape = w.shape or ir.Shape(w.const_value.shape)
            graph.inputs.append(w)
            weight_inputs[name] = w.name
            continue
        x = layer.activation
        if layer.kind == "embedding" or x is None or not spec.dynamic and x.name not in calibration.stats:
            continue
        sel = ir.Value(name=f"lpcompile_select_{i}",
                       const_value=ir.Tensor(np.array(False), name=f"lpcompile_select_{i}"))
        sel.dtype, sel.shape = ir.DataType.BOOL, ir.Shape([])
        graph.register_initializer(sel)
        graph.inputs.append(sel)
        if x.name not in qdq_cache:
            qdq_cache[x.name] = insert_activation_qdq(probe, layer, spec, calibration)
        where = ir.node("Where", [sel, qdq_cache[x.name], x], name=f"{sel.name}_where")
        where.outputs[0].name = f"{sel.name}_x"
        where.outputs[0].dtype, where.outputs[0].shape = x.dtype or ir.DataType.FLOAT, x.shape
        graph.insert_before(layer.node, where)
        layer.node.replace_input_with(0, where.outputs[0])
        selectors[name] = sel.name
    graph.sort()
    return probe, weight_inputs, selectors
