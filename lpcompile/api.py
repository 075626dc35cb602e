"""The Python API: `capture` and `compile`. compile() validates every argument, captures the
model, loads the calibration data, builds the pipeline of passes (`lpcompile.pipeline`) from a
recipe, a goal or a plan, runs it, and measures the result (`lpcompile.report`)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from lpcompile.backends.onnx import portable as portable_form
from lpcompile.calibration_data import as_calibration_data
from lpcompile.errors import LpcompileError, PassError, TargetError
from lpcompile.extras import require as require_extra
from lpcompile.frontend import capture
from lpcompile.goals import Goal
from lpcompile.ir import save_model, weight_bytes
from lpcompile.ir.patterns import find_linear_layers
from lpcompile.ir.run import OrtRunner
from lpcompile.ir.store import TensorStore, attach_store
from lpcompile.output import write_output
from lpcompile.passes.calibrate import CALIBRATION_KEY
from lpcompile.passes.rotate import REPORT_KEY as ROTATE_KEY
from lpcompile.passes.select import Select
from lpcompile.passes.attention import REPORT_KEY as ATTENTION_KEY, check_format as check_attention_format
from lpcompile.passes.awq import REPORT_KEY as AWQ_KEY
from lpcompile.passes.smooth import REPORT_KEY as SMOOTH_KEY
from lpcompile.pipeline import REFERENCE_KEY, Pipeline, build_pipeline, hold_out_for_report, split_for_verification
from lpcompile.plan import PLAN_KEY, Plan
from lpcompile.progress import Progress
from lpcompile.recipes import Recipe, get_recipe
from lpcompile.report import build_report, dumps, select_report, to_markdown
from lpcompile.targets import KINDS as TARGETS, parse as parse_target

__all__ = ["capture", "compile", "CompiledModel", "TARGETS", "EMITS"]

log = logging.getLogger(__name__)

AUTO = "auto"  # --format auto: a per-layer plan from the select pass (under a goal) or a user's plan
EMITS = ("onnx", "tvm", "mlir")
ROTATE_MODES = ("auto", "online", "fold", "off")
AWQ_MODES = ("off", "scale", "clip", "auto")
# Models with at least this many bytes of weights compile with a TensorStore (lpcompile.ir.store):
# the weights passes create (rotated, quantized) go to a scratch file instead of staying in memory,
# so that memory is bounded by the largest layer, not by the model.
SPILL_MODEL_BYTES = 512 << 20


@dataclass
class CompiledModel:
    """The result of `compile`: the QDQ model, its report, and a way to run it."""

    qdq_model: ir.Model
    report: dict
    recipe: Recipe | None  # None for format="auto"
    target: str  # the normalised target spec
    emit: tuple[str, ...] = ("onnx",)
    plan: Plan | None = None  # what each layer got (for recipes too): written as plan.json
    pipeline: Pipeline | None = field(default=None, repr=False)  # the passes that ran
    _runner: OrtRunner | None = field(default=None, repr=False)

    def run(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        """Run the quantized model in onnxruntime (graph optimizations off: the reference)."""
        if self._runner is None:
            self._runner = OrtRunner(self.qdq_model)
        feeds = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in feeds.items()}
        return self._runner.run(feeds)

    __call__ = run

    def save(self, out_dir: str | os.PathLike, portable: bool = True) -> Path:
        """Write `model.qdq.onnx`, `report.json`, `report.md` and `plan.json` into `out_dir` (with
        emit "tvm" also the TVM artifact: model.so, params.bin, manifest.json; with a measured plan
        the per-layer chart select.png), atomically: everything goes to a sibling temporary
        directory that replaces `out_dir` only when complete (`lpcompile.output.write_output`:
        an existing `out_dir` must be empty or a previous lpcompile output).

        When the TVM build fails, the finished quantization is not thrown away: `out_dir` still
        gets the QDQ model, the plan and a report recording the failure, and then the failure is
        raised (one line, naming where the QDQ model is).

        `portable` (default): model.qdq.onnx is the form onnxruntime (default session) and OpenVINO
        run with the results of onnxruntime without optimizations (`lpcompile.backends.onnx`:
        functions inlined, dynamic and float8 activation Q/DQ as arithmetic); False: the form with
        lpcompile's functions (`ai.lpcompile` Hadamard, PerTokenQDQ_*) that backends match. The
        TVM artifact is always built from the latter, in memory."""
        failure: list[LpcompileError] = []

        def fill(tmp: Path) -> None:
            report = dict(self.report)
            if "tvm" in self.emit:
                try:
                    report = self._export_tvm(tmp, report)
                except LpcompileError as e:
                    failure.append(e)
                    report = {**report, "tvm": {"build_failed": str(e)}}
            if "mlir" in self.emit:
                try:
                    report = self._export_mlir(tmp, report)
                except LpcompileError as e:
                    failure.append(e)
                    report = {**report, "mlir": {"failed": str(e)}}
            if "onnx" in self.emit or failure:
                qdq, rewritten = portable_form(self.qdq_model) if portable else (self.qdq_model, {})
                save_model(qdq, tmp / "model.qdq.onnx")
                report["qdq_onnx"] = {"form": "portable" if portable else "functions", "rewritten": dict(rewritten)}
            if self.plan is not None:
                self.plan.save(tmp / "plan.json")
            if "select" in report:
                from lpcompile.chart import write_select_chart

                write_select_chart(report["select"], tmp / "select.png")
            report["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
            (tmp / "report.json").write_text(dumps(report))
            (tmp / "report.md").write_text(to_markdown(report))

        write_output(out_dir, fill)
        if failure:
            raise type(failure[0])(f"{failure[0]} (the QDQ model, plan and report are in {out_dir})") from failure[0]
        return Path(out_dir)

    def _export_mlir(self, out: Path, report: dict) -> dict:
        """model.torch.mlir (+ model.linalg.mlir where torch-mlir lowers every op) from the
        portable form (functions inlined); the report gains its stage time and what was not written."""
        from lpcompile.backends.mlir import emit_mlir

        start = time.perf_counter()
        record = emit_mlir(ir.to_proto(portable_form(self.qdq_model)[0]), out)
        stages = {**report.get("stages_seconds", {}), "mlir": round(time.perf_counter() - start, 3)}
        return {**report, "stages_seconds": stages, "mlir": record}

    def _export_tvm(self, out: Path, report: dict) -> dict:
        """The TVM artifact into `out`; the report gains its stage time and what did not lower."""
        from lpcompile.backends.tvm.export import export_artifact

        target = parse_target(self.target).tvm()
        start = time.perf_counter()
        staging = out / ".tvm-build"  # the artifact's files move into `out` only when all were written
        staging.mkdir()
        from lpcompile.ir.fold import fold_weights

        # sparse layers' weights are computed from their compressed form: no TVM kernel reads that
        # form yet, so the artifact gets them expanded (the dense kernels of the same format)
        qdq, expanded = fold_weights(self.qdq_model)
        try:
            manifest = export_artifact(_weights_inline(qdq), target, staging, report=self.report)
        except LpcompileError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        except Exception as e:  # TVM's own errors: one line, the stage named
            shutil.rmtree(staging, ignore_errors=True)
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            raise TargetError(f"tvm build failed: {type(e).__name__}: {msg}") from e
        for path in staging.iterdir():
            os.replace(path, out / path.name)
        staging.rmdir()
        stages = {**report.get("stages_seconds", {}), "tvm build": round(time.perf_counter() - start, 3)}
        tvm = {"target": manifest["target"], "fallbacks": manifest["fallbacks"],
               "library_bytes": manifest["library_bytes"], "params_bytes": manifest["params_bytes"]}
        if expanded:
            tvm["sparse_weights"] = (f"{expanded} compressed weights expanded to the dense layout at build time "
                                     "(no TVM kernel reads the compressed form yet)")
        return {**report, "stages_seconds": stages, "tvm": tvm}


def _weights_inline(model: ir.Model) -> onnx.ModelProto:
    """The model as a ModelProto whose initializers hold their bytes: weights kept as external data
    (the user's model's own file, or the spill file of a large model) are referenced by a location
    relative to a directory the TVM importer does not know (it read them from the working
    directory: "Data of TensorProto (b1) should be stored in mlp.onnx.data, but it is not regular
    file"). TVM holds every weight in memory to build its parameters anyway."""
    proto = ir.to_proto(model)
    tensors = {name: v.const_value for name, v in model.graph.initializers.items() if v.const_value is not None}
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL and t.name in tensors:
            t.raw_data = tensors[t.name].tobytes()
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
    return proto


def compile(
    model: Any,
    target: str = "llvm",
    format: str = "int4",
    calibration: Any = None,
    exclude: Sequence[str] = (),
    example_inputs: Any = None,
    dynamic: Any = None,
    emit: Sequence[str] = ("onnx",),
    batch_size: int = 8,
    progress: Progress | None = None,
    rotate: str | None = None,
    goal: Goal | None = None,
    plan: Plan | str | os.PathLike | None = None,
    edit_pipeline: Callable[[Pipeline], Any] | None = None,
    smooth: str | float | None = None,
    awq: str = "off",
    sparsity: str | None = None,
    quantize_attention: str | None = None,
) -> CompiledModel:
    """Quantize `model` (path, ModelProto, IR model or torch module) for `target` (a spec:
    `lpcompile.targets`) with the recipe `format`, or with `format="auto"` a per-layer plan.
    `calibration`: see `lpcompile.calibration_data`; recipes with static activation scales need
    it; GPTQ uses it (else MSE rounding); it also measures the report's errors. For torch
    modules: `example_inputs` and `dynamic` as in `capture`. `exclude`: layers kept in float
    (fnmatch patterns on layer names, ":first", ":last"). `rotate`: "auto" | "online" | "fold" |
    "off" (None: the recipe's default, see `Recipe.default_rotate`; with format="auto" and a
    goal, both "auto" and "off" are tried and the better kept, see `_choose_rotation`).

    `format="auto"`: `goal` (`lpcompile.goals`: Bits, Bytes, Latency, MinCosine) makes the
    select pass measure each layer's sensitivity on the calibration data and solve for the goal;
    `plan` (a Plan or a plan.json path) pins layers, or, without a goal, is applied as it stands.
    `edit_pipeline(pipeline)` sees the passes before they run and may insert its own.
    `smooth`: SmoothQuant scale migration for recipes that quantize activations, "auto" (α
    searched per site), "off", or a fixed α in [0, 1] (None: `Recipe.default_smooth`).
    `awq`: activation-aware weight scaling ("scale"), GPTQ with output-error clipping per group
    ("clip"), both ("auto") or "off" (`lpcompile.passes.awq`).
    `sparsity`: "2:4", "4:8" or a pruned share ("0.5"), optionally ":wanda" / ":magnitude", for
    every dense layer of a recipe (`lpcompile.passes.sparsify`; a plan.json sets it per layer).
    `quantize_attention`: "int8" or "fp8" quantizes both inputs of every activation x activation
    MatMul (attention scores and context; `lpcompile.passes.attention`), None / "off" leaves them.
    Every argument is checked before any work; bad ones raise `LpcompileError` (one line)."""
    arguments = dict(locals())  # what a rotation choice compiles again with (see _choose_rotation)
    auto = format == AUTO
    if not auto and (goal is not None or plan is not None):
        raise LpcompileError("goal and plan apply to format='auto' only")
    if goal is not None and not isinstance(goal, Goal):
        raise LpcompileError(f"goal must be an lpcompile.goals.Goal (Bits, Bytes, Latency, MinCosine), got {goal!r}")
    tgt = parse_target(target)  # every bad target is refused here, before capture
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise LpcompileError(f"batch_size must be a whole number of samples >= 1, got {batch_size!r}")
    unknown = [e for e in emit if e not in EMITS]
    if unknown:
        raise TargetError(f"cannot emit {', '.join(unknown)} yet; available: {', '.join(EMITS)}")
    if "tvm" in emit:  # the TVM artifact is built last: a missing TVM is said before any work
        require_extra("tvm", "--emit tvm")
    if "mlir" in emit:  # torch-mlir's importer and lowering (lpcompile.backends.mlir)
        require_extra("torch_mlir", "--emit mlir")
    if rotate is not None and rotate not in ROTATE_MODES:
        raise LpcompileError(f"unknown rotate mode {rotate!r}; choose one of: {', '.join(ROTATE_MODES)}")
    recipe = None if auto else get_recipe(format)
    sparsity = _check_sparsity(sparsity, auto, calibration)
    quantize_attention = check_attention_format(quantize_attention)
    if quantize_attention is not None:
        if auto:
            raise LpcompileError("quantize_attention applies to a recipe (--format int8, int4, ...), not format auto")
        if calibration is None:
            raise LpcompileError("quantize_attention needs calibration data (--calibration) for its static scales")
        tgt.check_formats(["fp8_e4m3"] if quantize_attention == "fp8" else ["int8"], "--quantize-attention")
    smooth = check_smooth(smooth, recipe)
    if awq not in AWQ_MODES or awq != "off" and recipe is None:
        raise LpcompileError(f"awq must be one of {', '.join(AWQ_MODES)} with a named recipe, got {awq!r}"
                             + (" with format auto" if recipe is None else ""))
    if recipe is not None:  # a format the target cannot run is refused, whatever is emitted
        tgt.check_formats(recipe.format_names(), recipe.name)
    user_plan = Plan.load(plan) if isinstance(plan, (str, os.PathLike)) else plan
    if auto and goal is None and user_plan is None:
        raise LpcompileError("format 'auto' needs one goal: --budget BITS, --budget-bytes B, --budget-latency US or "
                             "--min-cosine C (or --plan FILE to reuse a plan)")
    if goal is not None and goal.needs_latency and (reason := tgt.timing_unavailable()) is not None:
        raise TargetError(f"--budget-latency needs kernel timings on target {tgt.spec}, and {reason}")
    if auto and goal is not None and rotate is None:  # the rotation is chosen too, by measuring both
        return _choose_rotation({**arguments, "target": tgt.spec, "plan": user_plan})
    if recipe is not None and rotate is None and recipe.default_rotate != "off" and calibration is not None:
        return _measure_recipe_rotation({**arguments, "target": tgt.spec})
    rotate = rotate or (recipe.default_rotate if recipe else "auto")
    stages: dict[str, float] = {}
    done: list[str] = []

    def stage(name):
        return _Stage(name, stages, done)

    with stage("capture"):
        # External data stays lazy (memory-mapped, read one weight at a time where a pass needs
        # it): nothing writes the files it came from (the output checks refuse -o over them).
        float_model = capture(model, example_inputs, dynamic)
        if weight_bytes(float_model) >= SPILL_MODEL_BYTES:  # what passes create goes to a scratch file too
            attach_store(float_model, TensorStore())
    layers = find_linear_layers(float_model.graph)
    if not layers:
        raise PassError("the model has no linear layers (MatMul/Gemm/Gather with constant weights) to quantize")
    if user_plan is not None or exclude and auto:  # exclusions are pins of a measured plan (its budget counts them)
        user_plan = (user_plan or Plan([])).with_exclusions(exclude, layers)
        user_plan.check_against(layers)
        if goal is None:
            tgt.check_formats(_plan_formats(user_plan.with_pins_applied()), "plan")
    if goal is not None:  # a goal no choice can meet is refused before any measurement
        probe = Select(None, goal, plan=user_plan, **tgt.select_options())
        goal.check_feasible(probe.problem(layers))
    with stage("load calibration"):
        data = as_calibration_data(calibration, float_model) if calibration is not None else None
    if data is None and (recipe.needs_calibration if recipe else goal is not None):
        raise LpcompileError(f"format {format!r} needs calibration data (--calibration FILE.npz|DIR|random:N)")
    fit, check, measured_on = data, None, None
    if goal is not None and goal.holdout_every and data is not None:
        # A cosine goal is verified on calibration batches that neither the statistics nor GPTQ
        # saw: on the batches they were fitted to the cosine is optimistic (MiniLM: 0.995 there,
        # 0.993 on held-out sentences).
        fit, check = split_for_verification(data, batch_size, goal.holdout_every)
        held = sum(len(next(iter(b.values()))) for b in check.batches(batch_size))
        measured_on = {"held_out": True, "samples": held, "text": f"the {held} calibration samples held out to verify"}
    elif data is not None:  # the report's error is measured on samples the fitting did not see
        fit, check, measured_on = hold_out_for_report(data, batch_size)
    verify = check if goal is not None and goal.holdout_every else None
    pipeline = build_pipeline(recipe=recipe, goal=goal, plan=user_plan, target=tgt, rotate=rotate, data=fit,
                              rotate_data=fit, check=verify, exclude=tuple(exclude), batch_size=batch_size,
                              progress=progress, smooth=smooth, awq=awq, sparsity=sparsity,
                              quantize_attention=quantize_attention)
    if edit_pipeline is not None:
        edit_pipeline(pipeline)
    qdq = float_model.clone()  # new nodes and values, the same tensors: the float model stays the reference
    start = time.perf_counter()
    try:
        qdq = pipeline.run(qdq)
    finally:
        stages.update({name: sec for name, sec in pipeline.seconds.items()})
        stages.setdefault("pipeline", time.perf_counter() - start)
    reference = qdq.meta.get(REFERENCE_KEY, float_model)
    chosen: Plan = qdq.meta[PLAN_KEY]
    cal = qdq.meta.get(CALIBRATION_KEY)
    cal_info = None if cal is None else {
        "source": cal.source, "samples": cal.num_samples, "is_random": cal.is_random, "seconds": round(cal.seconds, 3)
    }
    with stage("measure"):
        measured = check if check is not None else fit
        batches = measured.batches(batch_size) if measured is not None else []
        report = build_report(reference, qdq, batches, format=format, target=tgt.spec, calibration=cal_info,
                              stages=stages, excluded=list(exclude), original=float_model)
        report["measured_on"] = measured_on
    chosen.annotate_rotations(qdq.meta.get(ROTATE_KEY), rotate)
    if recipe is not None:
        report["recipe"] = {"weights": str(recipe.weights), "activations": str(recipe.activations) if recipe.activations else None,
                            "embeddings": str(recipe.embeddings) if recipe.embeddings else None, "method": recipe.method,
                            "description": recipe.description}
    else:
        report["select"] = select_report(chosen, report, find_linear_layers(float_model.graph), goal)
    report["pipeline"] = pipeline.names()
    report["stages_seconds"] = {k: round(v, 3) for k, v in stages.items()}
    report["rotate"] = {"mode": rotate, **_rotation_summary(qdq.meta.get(ROTATE_KEY))}
    report["smooth"] = {"mode": smooth, **_plain_json(qdq.meta.get(SMOOTH_KEY) or {})}
    report["awq"] = {"mode": awq, **_plain_json(qdq.meta.get(AWQ_KEY) or {})}
    if quantize_attention is not None:
        report["quantize_attention"] = _plain_json(qdq.meta.get(ATTENTION_KEY) or {})
    for key in (REFERENCE_KEY,):  # the reference copy is not part of the result
        qdq.meta.pop(key, None)
    return CompiledModel(qdq, report, recipe, tgt.spec, tuple(emit), plan=chosen, pipeline=pipeline)


def check_smooth(smooth: str | float | None, recipe: Recipe | None) -> str | float:
    """The smooth setting to run ("auto", "off" or α), or a one-line refusal."""
    if smooth is None:
        return recipe.default_smooth if recipe is not None else "off"
    if smooth not in ("auto", "off"):
        try:
            smooth = float(smooth)
        except (TypeError, ValueError):
            raise LpcompileError(f"smooth must be auto, off or an alpha in [0, 1], got {smooth!r}") from None
        if not 0.0 <= smooth <= 1.0:
            raise LpcompileError(f"smooth alpha must lie in [0, 1], got {smooth}")
    if smooth != "off" and (recipe is None or recipe.activations is None):
        what = "format auto" if recipe is None else f"format {recipe.name} (float activations)"
        raise LpcompileError(f"--smooth migrates activation outliers into weights: {what} quantizes no activations")
    return smooth


def _plain_json(obj):
    """numpy values in a pass's report as plain JSON values."""
    if isinstance(obj, dict):
        return {str(k): _plain_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain_json(v) for v in obj]
    return obj.item() if hasattr(obj, "item") else obj


def _check_sparsity(sparsity: str | None, auto: bool, calibration: Any) -> str | None:
    """The sparsity pattern to apply to every dense layer (normalised), or a one-line refusal."""
    if sparsity is None:
        return None
    from lpcompile.passes.sparsify import SparsityPattern

    pattern = SparsityPattern.parse(sparsity)
    if auto:
        raise LpcompileError("sparsity applies to a recipe (--format int8, int4, ...); with format auto a "
                             "plan.json sets it per layer")
    if pattern.criterion != "magnitude" and calibration is None:
        raise LpcompileError(f"sparsity {pattern} ({pattern.criterion}) needs calibration data "
                             f"(--calibration); {pattern}:magnitude does not")
    return str(pattern)


def _plan_formats(plan: Plan) -> set[str]:
    return {spec.format.name for c in plan.layers for spec in (c.weights, c.activations) if spec is not None}


ROTATION_CANDIDATES = ("auto", "off")


def _choose_rotation(kwargs: dict) -> "CompiledModel":
    """format='auto' with a goal and no rotate mode: the model is selected and quantized once per
    ROTATION_CANDIDATES (the sensitivities differ with the basis) and the better result is kept:
    under a cosine goal the one that met it with fewer weight bits, else the higher output SQNR
    against the float model on the calibration data, the goal met first. Rotation does not always
    pay: on the LLaMA-shaped model at 4.3 bits, selection without it reached 25.4 dB, with it 22.7
    (benchmarks/results/select_auto.md)."""
    tried = {mode: compile(**{**kwargs, "rotate": mode}) for mode in ROTATION_CANDIDATES}

    def rank(c: CompiledModel):
        achieved = c.report["select"]["achieved"]
        met = bool(c.plan.totals.get("met", achieved["budget_met"]))
        sqnr = achieved["output_sqnr_db"] if achieved["output_sqnr_db"] is not None else -math.inf
        if kwargs["goal"].holdout_every:
            return (met, -achieved["avg_weight_bits"], sqnr)
        return (met, sqnr)

    mode = max(tried, key=lambda m: rank(tried[m]))
    best = tried[mode]
    best.report["rotate"]["chosen_from"] = {
        m: {"output_sqnr_db": c.report["select"]["achieved"]["output_sqnr_db"],
            "output_cosine": c.report["select"]["achieved"]["output_cosine"],
            "avg_weight_bits": c.report["select"]["achieved"]["avg_weight_bits"],
            "goal_met": c.report["select"]["achieved"]["budget_met"]} for m, c in tried.items()}
    best.report["select"]["rotation_chosen"] = mode
    return best


def _measure_recipe_rotation(kwargs: dict) -> "CompiledModel":
    """A recipe whose default rotates (`Recipe.default_rotate`), with calibration data and no
    rotate mode asked for: the rotation is kept only if it lowers the output error measured on the
    calibration samples held out from fitting; else the model is quantized again unrotated (issue 11
    measured a LayerNorm MLP where int4 with the default rotation reached 0.9945 cosine on unseen
    data and 0.9973 without it). With nothing held out (fewer than 4 calibration batches)
    or nothing rotated, the recipe's default stands unmeasured, and the report says so."""
    rotated = compile(**{**kwargs, "rotate": "auto"})
    rot = rotated.report["rotate"]
    measured = rotated.report.get("measured_on") or {}
    if not measured.get("held_out") or not any(rot.get("counters", {}).get(k) for k in ROTATED_COUNTERS):
        rot["choice"] = ("kept unmeasured: nothing held out to measure on" if not measured.get("held_out")
                         else "nothing was rotated")
        return rotated
    plain = compile(**{**kwargs, "rotate": "off"})

    def error(c: CompiledModel) -> float:
        sqnr = c.report["totals"]["output_sqnr_db"]
        return sqnr if sqnr is not None else -math.inf

    best = rotated if error(rotated) > error(plain) else plain
    best.report["rotate"]["chosen_from"] = {
        m: {"output_sqnr_db": c.report["totals"]["output_sqnr_db"], "output_cosine": c.report["totals"]["output_cosine"],
            "samples": measured.get("samples")} for m, c in (("auto", rotated), ("off", plain))}
    best.report["rotate"]["choice"] = ("kept: it lowers the held-out error" if best is rotated
                                       else "dropped: it does not lower the held-out error")
    return best


ROTATED_COUNTERS = ("regions_folded", "chains_folded", "cross_head_online", "online")


def _rotation_summary(meta) -> dict:
    """What the rotate pass did, JSON-ready (its own report, with numpy values made plain and
    non-finite measurements, e.g. the kurtosis of a constant input, as null)."""
    if not meta:
        return {}
    plain = json.loads(json.dumps(meta, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    return _finite(plain)


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


class _Stage:
    """Times a stage; on failure names the stages that already ran (Ctrl-C and exits pass as they are)."""

    def __init__(self, name: str, stages: dict[str, float], done: list[str]):
        self.name, self.stages, self.done = name, stages, done

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.stages[self.name] = time.perf_counter() - self.start
        if exc is None:
            self.done.append(self.name)
            return False
        if isinstance(exc, LpcompileError) or not isinstance(exc, Exception):
            return False
        ran = ", ".join(self.done) or "nothing"
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise PassError(f"{self.name} failed after [{ran}]: {type(exc).__name__}: {msg}") from exc
