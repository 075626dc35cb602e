"""The select pass: measure (`sensitivity`), build the `Problem`, let the goal solve it, and
write the plan with the reasons for each choice."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import onnx_ir as ir

from lpcompile.cache import read_json, write_json
from lpcompile.errors import LpcompileError, PassError
from lpcompile.formats import QuantSpec
from lpcompile.goals import ACTIVATION_CANDIDATES, Goal, Problem
from lpcompile.ir.patterns import LinearLayer, find_linear_layers
from lpcompile.metrics import nsr_to_db
from lpcompile.passes.calibrate import CALIBRATION_KEY, Calibration
from lpcompile.passes.select.costs import (
    DEPLOYABLE_FP8, EMBEDDING_CANDIDATES, WEIGHT_CANDIDATES, LatencyCosts, _e2e, _measured, option_key,
)
from lpcompile.passes.select.sensitivity import _fingerprint, _take, measure_sensitivity
from lpcompile.plan import PLAN_KEY, LayerChoice, Plan, parse_spec, spec_text, weight_bits
from lpcompile.progress import Progress

log = logging.getLogger(__name__)


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


