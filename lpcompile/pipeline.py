"""Pipelines: the ordered list of passes `compile()` and the CLI run, as data.

    pipe = build_pipeline(recipe=get_recipe("int8"), calibration=data)
    str(pipe)                       # "rotate -> keep-reference -> calibrate -> plan -> quantize -> cleanup"
    pipe.insert_after("quantize", MyPass())
    model = pipe.run(model)         # an onnx_ir.Model (pipe(model) gives onnx_ir's PassResult)

Every pass is an `onnx_ir.passes` pass; a Pipeline is one too, so it nests in another pass
manager. Running times each pass (`seconds`) and a failure names the passes that already ran.
`compile(..., edit_pipeline=fn)` hands the pipeline it built to `fn` before running it, so a user
can inspect and extend exactly what the CLI runs.

Besides the library's passes (`lpcompile.passes`), a few steps of `compile` are passes here:
`KeepReference` (the float graph, in the rotated basis, that errors are measured against),
`MeasureLatency` (the backend's kernel timings for a latency goal), `ApplyPlan` (a user's
plan.json) and `MeetMinCosine` (quantize, verify on held-out data, re-solve).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lpcompile.calibration_data import CalibrationData
from lpcompile.errors import LpcompileError, PassError
from lpcompile.goals import Goal
from lpcompile.ir.patterns import find_linear_layers
from lpcompile.ir.store import trim_heap
from lpcompile.passes.calibrate import Calibrate
from lpcompile.passes.cleanup import Cleanup
from lpcompile.passes.quantize import Quantize, UniformPlan
from lpcompile.passes.rotate import Rotate
from lpcompile.passes.awq import AwqScale
from lpcompile.passes.smooth import Smooth
from lpcompile.passes.sparsify import Sparsify
from lpcompile.passes.select import LatencyCosts, Select, option_key, spec_text
from lpcompile.plan import PLAN_KEY, Plan
from lpcompile.progress import Progress

log = logging.getLogger(__name__)

REFERENCE_KEY = "lpcompile.reference"  # model.meta: the float model errors are measured against
LATENCY_KEY = "lpcompile.latency_costs"  # model.meta: LatencyCosts from MeasureLatency


def pass_name(p) -> str:
    """How a pass is named in a pipeline: the name it was given, else its class in kebab case."""
    return getattr(p, "name_in_pipeline", None) or re.sub(r"(?<!^)(?=[A-Z])", "-", type(p).__name__).lower()


class Pipeline(ir.passes.PassBase):
    """An ordered list of passes run one after the other on one model (see the module docstring)."""

    def __init__(self, passes: Sequence = ()):
        self.passes = list(passes)
        self.seconds: dict[str, float] = {}
        self.ran: list[str] = []

    @property
    def in_place(self) -> bool:  # a functional pass (MeetMinCosine) hands back another model
        return all(getattr(p, "in_place", True) for p in self.passes)

    @property
    def changes_input(self) -> bool:
        return True

    def run(self, model: ir.Model) -> ir.Model:
        """The passes on `model`; the model they leave (the same object unless one is functional)."""
        return self(model).model

    def names(self) -> list[str]:
        return [pass_name(p) for p in self.passes]

    def __str__(self) -> str:
        return " -> ".join(self.names())

    def __repr__(self) -> str:
        return f"Pipeline({self})"

    def __len__(self) -> int:
        return len(self.passes)

    def __iter__(self):
        return iter(self.passes)

    def index(self, name: str) -> int:
        """The position of the first pass named `name` (its `pass_name`, e.g. "quantize")."""
        names = self.names()
        for i, n in enumerate(names):
            if n == name:
                return i
        raise LpcompileError(f"no pass named {name!r} in the pipeline ({self})")

    def insert_before(self, name: str, p) -> "Pipeline":
        self.passes.insert(self.index(name), p)
        return self

    def insert_after(self, name: str, p) -> "Pipeline":
        self.passes.insert(self.index(name) + 1, p)
        return self

    def append(self, p) -> "Pipeline":
        self.passes.append(p)
        return self

    def remove(self, name: str) -> "Pipeline":
        del self.passes[self.index(name)]
        return self

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for p in self.passes:
            name = pass_name(p)
            start = time.perf_counter()
            try:
                result = p(model)
            except LpcompileError:
                raise
            except Exception as e:  # KeyboardInterrupt and SystemExit pass through as they are
                ran = ", ".join(self.ran) or "nothing"
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise PassError(f"{name} failed after [{ran}]: {type(e).__name__}: {msg}") from e
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            trim_heap()  # what the pass freed (sessions, weight temporaries) is not held into the next one
            self.ran.append(name)
            if result.model is not model:  # a functional pass: carry the analyses over
                for key, value in model.meta.items():
                    result.model.meta.setdefault(key, value)
            model, modified = result.model, modified or result.modified
        return ir.passes.PassResult(model, modified)


def _named(p, name: str):
    """`p` with the name it shows in a pipeline (onnx_ir passes are frozen dataclasses)."""
    object.__setattr__(p, "name_in_pipeline", name)
    return p


def copy_model(model: ir.Model) -> ir.Model:
    """A copy of the graph (new nodes and values, the same weight tensors) with the passes'
    analysis results (meta) carried over. Sharing the tensors is safe because no pass writes into
    a tensor: a pass that changes a weight (rotate's folding, quantize) registers a new
    initializer and rewires its users, so the copy and the original never see each other's
    edits; and it costs no weight memory (serializing through protobuf held each weight three
    times over, and read external data in)."""
    copy = model.clone()
    for key, value in model.meta.items():
        copy.meta[key] = value
    return copy


# --- compile's own steps, as passes ----------------------------------------------------------------


@dataclass(frozen=True)
class KeepReference(ir.passes.InPlacePass):
    """Keep a copy of the model as it is now (after rotation: per-layer errors compare each layer
    with its float self in the same basis; a folded rotation changes intermediate tensors, never
    the outputs) in `model.meta[REFERENCE_KEY]`, for the report and MeetMinCosine."""

    def call(self, model):
        model.meta[REFERENCE_KEY] = copy_model(model)
        return ir.passes.PassResult(model, modified=False)


@dataclass(frozen=True)
class ApplyPlan(ir.passes.InPlacePass):
    """A user's plan (plan.json) as the plan to apply, its pins written into its layers."""

    plan: Plan

    def call(self, model):
        self.plan.check_against(find_linear_layers(model.graph))
        model.meta[PLAN_KEY] = self.plan.with_pins_applied()
        return ir.passes.PassResult(model, modified=False)


@dataclass(frozen=True)
class MeasureLatency(ir.passes.InPlacePass):
    """The backend's kernel latency of every option `select` may give each layer (timed on the
    target, or found in the cache), as `LatencyCosts` in `model.meta[LATENCY_KEY]`."""

    select: Select
    target: object  # lpcompile.targets.Target
    tokens: int = 1
    progress: Progress | None = None

    def call(self, model):
        layers = find_linear_layers(model.graph)
        options = {l.name: self.select.options(l, None) for l in layers}
        model.meta[LATENCY_KEY] = latency_costs(layers, self.target, self.tokens, options, self.progress)
        return ir.passes.PassResult(model, modified=False)


@dataclass(frozen=True)
class SelectWithLatency(ir.passes.InPlacePass):
    """Select, handed the latencies MeasureLatency found (its goal needs them), or reporting the
    chosen layers' latency where the target can be timed here."""

    select: Select

    def call(self, model):
        costs = model.meta.get(LATENCY_KEY)
        select = dataclasses.replace(self.select, latency=costs) if costs is not None else self.select
        return select(model)


# Share of the allowed loss (1 - C) held in reserve for deployment data unlike the calibration
# set: on MiniLM a plan whose held-out calibration bound just reached 0.995 measured 0.99484 on
# the 224 evaluation sentences (their loss 3% above the calibration sentences').
MIN_COSINE_RESERVE = 0.2


@dataclass(frozen=True)
class MeetMinCosine(ir.passes.FunctionalPass):
    """Quantize as planned and measure the mean output cosine on `check` (calibration batches held
    out from fitting), taking its one-sided 95% lower confidence bound; then re-solve with the
    predicted loss rescaled by how far the prediction was off (tighter when the target was
    missed, looser when it was beaten with room to spare), up to `tries` QDQ models. Returns the
    cheapest one that met the target, else the most accurate one tried. The target checked is C
    tightened by MIN_COSINE_RESERVE of its loss (the user's C is what is reported)."""

    select: Select
    check: CalibrationData
    batch_size: int = 8
    tries: int = 4
    progress: Progress | None = None

    def call(self, model):
        from lpcompile.report import measure_error

        reference = model.meta[REFERENCE_KEY]
        plan = model.meta[PLAN_KEY]
        layers = find_linear_layers(model.graph)
        user_target = self.select.goal.value
        target = 1.0 - (1.0 - user_target) * (1.0 - MIN_COSINE_RESERVE)
        loss_goal = 1.0 - target
        history, tried, met, best = [], set(), None, None
        for _ in range(self.tries):
            qdq = materialize(model, plan, self.progress)
            _, outputs = measure_error(reference, qdq, self.check.batches(self.batch_size))
            samples = np.array(next(iter(outputs.values())).cosines, np.float64)
            # The held-out batches are a sample too: the target must hold for the one-sided 95%
            # lower confidence bound of the mean cosine, not just for the mean (MiniLM: a mean of
            # 0.99503 on 56 held-out calibration sentences was 0.99438 on 224 evaluation sentences).
            mean = float(samples.mean())
            cos = mean - 1.645 * float(samples.std(ddof=1)) / math.sqrt(len(samples)) if len(samples) > 1 else mean
            stat = getattr(self.select.goal, "stat", "mean")  # a tail goal checks its own statistic
            if stat != "mean":
                cos = float(samples.min()) if stat == "min" else float(np.percentile(samples, 5))
            bits = plan.totals["weight_bits"]
            tried.add(tuple(str(c.weights) for c in plan.layers))
            history.append({"solved_for_cosine": 1.0 - loss_goal, "predicted_cosine": plan.totals.get("predicted_cosine"),
                            "measured_cosine": mean, "measured_cosine_lower_bound": cos, "samples": len(samples),
                            "avg_weight_bits": plan.totals.get("avg_weight_bits"), "stat": stat,
                            "measured_cosine_min": float(samples.min()),
                            "measured_cosine_p5": float(np.percentile(samples, 5))})
            if cos >= target and (met is None or bits < met[1].totals["weight_bits"]):
                met = (qdq, plan, cos)
            if best is None or cos > best[2]:
                best = (qdq, plan, cos)
            predicted_loss = max(1.0 - plan.totals["predicted_cosine"], 1e-12)
            ratio = predicted_loss / max(1.0 - cos, 1e-12)  # > 1: the prediction was pessimistic
            loss_goal = (1.0 - target) * ratio * (0.95 if cos < target else 1.0)
            if met is not None and cos < target:
                break  # loosening overshot: keep the cheapest plan that met the target
            goal = dataclasses.replace(self.select.goal, value=min(max(1.0 - loss_goal, 1e-6), 1 - 1e-12))
            try:
                plan = dataclasses.replace(self.select, goal=goal).solve(layers, plan.sensitivity)
            except LpcompileError:
                break
            if tuple(str(c.weights) for c in plan.layers) in tried:
                break
        qdq, plan, cos = met or best
        plan.budget = {"kind": "min_cosine", "value": user_target, "checked_against": target, "stat": stat,
                       "solved_for": plan.budget.get("value")}
        plan.totals["verification"] = history
        plan.totals["measured_cosine_lower_bound"] = cos
        plan.totals["met"] = bool(cos >= target)
        qdq.meta[PLAN_KEY] = plan
        return ir.passes.PassResult(qdq, modified=True)


def materialize(model: ir.Model, plan: Plan, progress: Progress | None) -> ir.Model:
    """The plan as QDQ, on a copy (`model` stays the calibrated float graph)."""
    qdq = copy_model(model)
    Quantize(plan, progress=_step(progress, "quantize"))(qdq)
    Cleanup()(qdq)
    qdq.meta[PLAN_KEY] = plan
    return qdq


def split_for_verification(data: CalibrationData, batch_size: int, every: int = 4):
    """(every batch but each `every`-th, each `every`-th batch) as two CalibrationData."""
    batches = list(data.batches(batch_size))
    if len(batches) < 2:
        raise LpcompileError(f"--min-cosine holds out calibration batches to verify on: {len(batches)} batch of "
                             f"{batch_size} is too few (give more samples or a smaller --batch-size)")
    check = batches[every - 1 :: every] or batches[-1:]
    fit = [b for b in batches if not any(b is c for c in check)]
    n = lambda bs: sum(len(next(iter(b.values()))) for b in bs)  # noqa: E731
    label = f"{data.label}; {n(fit)} samples fitted, {n(check)} held out to verify --min-cosine"
    return (CalibrationData(data.specs, label, data.is_random, _batches=fit),
            CalibrationData(data.specs, label, data.is_random, _batches=check))


REPORT_HOLDOUT_EVERY = 4  # the report's error is measured on every 4th calibration batch, held out


def hold_out_for_report(data: CalibrationData, batch_size: int):
    """(fit, held, measured_on): the calibration data split so the report's error is measured on
    samples that neither calibration statistics nor GPTQ / scale search saw (every
    REPORT_HOLDOUT_EVERY-th batch; a LayerNorm MLP measured 0.9993 cosine on its fitted samples and
    0.9945 on unseen ones). With fewer batches than that nothing is held out: `held` is None and
    the report says it measured the fitted samples."""
    batches = list(data.batches(batch_size))
    n = lambda bs: sum(len(next(iter(b.values()))) for b in bs)  # noqa: E731
    if len(batches) < REPORT_HOLDOUT_EVERY:
        return data, None, {"held_out": False, "samples": n(batches),
                            "text": f"the {n(batches)} fitted calibration samples (nothing held out: fewer than "
                                    f"{REPORT_HOLDOUT_EVERY} batches of {batch_size})"}
    held = batches[REPORT_HOLDOUT_EVERY - 1 :: REPORT_HOLDOUT_EVERY]
    fit = [b for b in batches if not any(b is h for h in held)]
    label = f"{data.label}; {n(fit)} samples fitted, {n(held)} held out to measure the report"
    return (CalibrationData(data.specs, label, data.is_random, _batches=fit),
            CalibrationData(data.specs, label, data.is_random, _batches=held),
            {"held_out": True, "samples": n(held), "fitted": n(fit),
             "text": f"{n(held)} held-out calibration samples ({n(fit)} fitted)"})


# --- latency: the backend's measurements as data for select -------------------------------------


def _linear_shape(layer, tokens: int):
    """The layer's matmul for the latency model: its row count where the model fixes it, else
    symbolic and timed at `tokens` rows."""
    from lpcompile.backends.tvm.latency import LinearShape

    shape = layer.activation.shape if layer.activation is not None else None
    dims = list(shape) if shape is not None else []
    if len(dims) >= 2 and all(isinstance(d, int) for d in dims[:-1]):
        return LinearShape(math.prod(dims[:-1]), layer.in_features, layer.out_features, static=True)
    return LinearShape(tokens, layer.in_features, layer.out_features)


def latency_costs(layers, target, tokens: int, options: dict[str, list], progress) -> LatencyCosts:
    """The backend's kernel latency of each layer's `options` [(weights, activations)], as data
    for the select pass. Embedding tables (gathers) are not timed."""
    from lpcompile.backends.tvm.latency import REPEATS, LatencyModel

    model = LatencyModel(target.tvm(), progress=progress)
    model.check()
    shapes = {l.name: _linear_shape(l, tokens) for l in layers if l.kind != "embedding"}
    table = model.table([(shapes[name], w, a) for name, opts in options.items() if name in shapes for w, a in opts])
    per_layer = {}
    for name, opts in options.items():
        if name in shapes:
            timed = {option_key(w, a): table[(shapes[name], spec_text(w), spec_text(a))] for w, a in opts}
            per_layer[name] = {k: v for k, v in timed.items() if v is not None}
    static = sorted({s.rows for s in shapes.values() if s.static})
    note = (f"matmul kernel + input quantization per linear layer, median of {REPEATS} warm-cache repeats; "
            f"{model.built} kernels timed now, the rest from the cache {model.path}"
            + (f"; layers with a fixed row count timed at it ({', '.join(map(str, static))})" if static else ""))
    return LatencyCosts(per_layer, tokens, target.spec, note)


def report_latency(plan: Plan, layers, target, tokens: int, progress) -> None:
    """The chosen formats' kernel latency into `plan` where `target` can be timed here; else the
    reason, and no number."""
    reason = target.timing_unavailable()
    if reason is not None:
        plan.totals["latency_us"] = None
        plan.totals["latency"] = {"not_measured": reason}
        return
    chosen = {c.name: [(c.weights, c.activations)] for c in plan.layers}
    try:
        costs = latency_costs([l for l in layers if l.name in chosen], target, tokens, chosen, progress)
    except Exception as e:  # a report line must not fail the compile (the latency budget path raises)
        log.warning("latency: not measured: %s: %s", type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else "")
        plan.totals["latency_us"] = None
        plan.totals["latency"] = {"not_measured": f"timing failed: {type(e).__name__}"}
        return
    plan.set_latency(costs, frozenset(l.name for l in layers if l.kind == "embedding"))


@dataclass(frozen=True)
class ReportLatency(ir.passes.InPlacePass):
    """The chosen layers' kernel latency into the plan (where the target can be timed here)."""

    target: object
    tokens: int = 1
    progress: Progress | None = None

    def call(self, model):
        plan = model.meta.get(PLAN_KEY)
        if plan is not None and LATENCY_KEY not in model.meta:
            # the layers as they were before quantization (their weights constants, shapes plain)
            float_model = model.meta.get(REFERENCE_KEY, model)
            report_latency(plan, find_linear_layers(float_model.graph), self.target, self.tokens, self.progress)
        return ir.passes.PassResult(model, modified=False)


def _step(progress: Progress | None, name: str):
    if progress is None:
        return None
    return lambda i, n: progress(name, i, n)


# --- building ------------------------------------------------------------------------------------


def build_pipeline(*, recipe=None, goal: Goal | None = None, plan: Plan | None = None, target=None,
                   rotate: str = "off", data: CalibrationData | None = None, rotate_data: CalibrationData | None = None,
                   check: CalibrationData | None = None,
                   exclude: Sequence[str] = (), batch_size: int = 8, progress: Progress | None = None,
                   smooth: str | float = "off", awq: str = "off", sparsity: str | None = None,
                   quantize_attention: str | None = None) -> Pipeline:
    """The passes `compile` runs: [rotate] -> keep reference -> [calibrate] -> plan (a recipe's
    uniform plan, select under `goal`, or the user's `plan`) -> quantize -> cleanup.
    `data`: the calibration batches statistics and GPTQ fit on; `rotate_data`: what the rotate
    pass measures outliers on (default `data`); `check`: batches held out to verify a goal with
    `holdout_every` (MinCosine). `target`: a parsed `lpcompile.targets.Target`. `sparsity`: a
    pattern for every dense layer of the recipe's plan; a sparsify pass runs before quantize when
    it is given or the user's plan asks for sparsity."""
    passes = []
    if smooth != "off" and data is not None and recipe is not None and recipe.activations is not None:
        # before rotation: once rotated, a norm's output reaches its linears through an online
        # Hadamard (MiniLM), which has no per-channel scale to fold 1/s into
        passes.append(_named(Smooth(data, recipe.activations, recipe.weights,
                                    None if smooth == "auto" else float(smooth), batch_size=batch_size), "smooth"))
    if awq in ("scale", "auto") and data is not None and recipe is not None:
        passes.append(_named(AwqScale(data, recipe.activations, recipe.weights, batch_size=batch_size), "awq"))
    if awq in ("clip", "auto") and recipe is not None and recipe.method == "gptq":
        recipe = dataclasses.replace(recipe, method="gptq-clip")  # GPTQ with output-error clipping per group
    if rotate != "off":  # before calibration: the statistics must be of rotated activations
        passes.append(_named(Rotate(mode=rotate, data=rotate_data or data, batch_size=batch_size), "rotate"))
    passes.append(_named(KeepReference(), "keep-reference"))
    if data is not None:
        gram_for = None if recipe is None or recipe.method in ("gptq", "gptq-clip") or sparsity else frozenset()
        passes.append(_named(Calibrate(data, batch_size, gram_for, _step(progress, "calibrate")), "calibrate"))
    tokens = goal.tokens if goal is not None else 1
    if recipe is not None:
        passes.append(_named(UniformPlan.from_recipe(recipe, exclude, sparsity), "plan"))
    elif goal is not None:
        select = Select(data, goal, batch_size=max(batch_size, 16), plan=plan, **target.select_options(),
                        rotation=rotate, progress=progress, cache=True)
        if goal.needs_latency:
            passes.append(_named(MeasureLatency(select, target, tokens, progress), "latency"))
        passes.append(_named(SelectWithLatency(select), "select"))
        if goal.holdout_every:
            passes.append(_named(MeetMinCosine(select, check, batch_size, progress=progress), "quantize"))
    else:
        passes.append(_named(ApplyPlan(plan), "plan"))
    if sparsity or plan is not None and any(c.sparsity for c in plan.layers):
        # one-shot: every layer's XᵀX from calibrate (on MiniLM, re-measuring it on the model pruned
        # so far, Sparsify(data=...), gave 0.9222 against 0.9212 cosine at 50% + int8, for 8x the time)
        passes.append(_named(Sparsify(), "sparsify"))
    if goal is None or not goal.holdout_every:
        passes.append(_named(Quantize(progress=_step(progress, "quantize")), "quantize"))
    if quantize_attention is not None:  # after the layers: its ranges are the quantized model's
        from lpcompile.passes.attention import QuantizeAttention

        passes.append(_named(QuantizeAttention(data, quantize_attention, batch_size), "quantize-attention"))
    passes.append(_named(Cleanup(), "cleanup"))
    if recipe is None:  # what the chosen formats cost, where this machine can time the target
        passes.append(_named(ReportLatency(target, tokens, progress), "latency-report"))
    return Pipeline(passes)
