"""The Python API: `capture` and `compile`, composing frontends, passes, backends and the report."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from lpcompile.calibration_data import CalibrationData, as_calibration_data
from lpcompile.errors import LpcompileError, PassError, TargetError
from lpcompile.frontend import capture
from lpcompile.ir import save_model
from lpcompile.ir.patterns import find_linear_layers
from lpcompile.ir.run import OrtRunner
from lpcompile.passes.calibrate import CALIBRATION_KEY, Calibrate
from lpcompile.passes.cleanup import Cleanup
from lpcompile.passes.quantize import Quantize
from lpcompile.passes.rotate import REPORT_KEY as ROTATE_KEY, Rotate
from lpcompile.recipes import Recipe, get_recipe
from lpcompile.report import build_report, dumps, to_markdown

__all__ = ["capture", "compile", "CompiledModel", "TARGETS", "EMITS"]

TARGETS = ("llvm", "aarch64", "cuda")  # llvm = this CPU; aarch64[:CPU]; cuda[:sm_XX] (see backends.tvm.target)
EMITS = ("onnx", "tvm")
ROTATE_MODES = ("auto", "online", "fold", "off")

Progress = Callable[[str, int, int], None]


@dataclass
class CompiledModel:
    """The result of `compile`: the QDQ model, its report, and a way to run it."""

    qdq_model: ir.Model
    report: dict
    recipe: Recipe
    target: str
    emit: tuple[str, ...] = ("onnx",)
    _runner: OrtRunner | None = field(default=None, repr=False)

    def run(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        """Run the quantized model in onnxruntime (graph optimizations off: the reference)."""
        if self._runner is None:
            self._runner = OrtRunner(self.qdq_model)
        feeds = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in feeds.items()}
        return self._runner.run(feeds)

    __call__ = run

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write `model.qdq.onnx`, `report.json` and `report.md` into `out_dir` (with emit "tvm"
        also the TVM artifact: model.so, params.bin, manifest.json), atomically: everything goes
        to a sibling temporary directory that replaces `out_dir` only when complete."""
        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            if "onnx" in self.emit:
                save_model(self.qdq_model, tmp / "model.qdq.onnx")
            report = dict(self.report)
            if "tvm" in self.emit:
                report = self._export_tvm(tmp, report)
            report["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
            (tmp / "report.json").write_text(dumps(report))
            (tmp / "report.md").write_text(to_markdown(report))
            _replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out


    def _export_tvm(self, out: Path, report: dict) -> dict:
        """The TVM artifact into `out`; the report gains its stage time and what did not lower."""
        from lpcompile.backends.tvm.export import export_artifact
        from lpcompile.backends.tvm.target import resolve

        target = resolve(self.target)
        start = time.perf_counter()
        try:
            manifest = export_artifact(ir.to_proto(self.qdq_model), target, out, report=self.report)
        except LpcompileError:
            raise
        except Exception as e:  # TVM's own errors: one line, the stage named
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            raise TargetError(f"tvm build failed: {type(e).__name__}: {msg}") from e
        stages = {**report.get("stages_seconds", {}), "tvm build": round(time.perf_counter() - start, 3)}
        tvm = {"target": manifest["target"], "fallbacks": manifest["fallbacks"],
               "library_bytes": manifest["library_bytes"], "params_bytes": manifest["params_bytes"]}
        return {**report, "stages_seconds": stages, "tvm": tvm}


def _replace_dir(new: Path, dest: Path) -> None:
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(new, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, dest)


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
) -> CompiledModel:
    """Quantize `model` (path, ModelProto, IR model or torch module) with the recipe `format`
    for `target`. `calibration`: see `lpcompile.calibration_data`; recipes with static
    activation scales need it; GPTQ uses it (else MSE rounding); it also measures the report's
    errors. For torch modules: `example_inputs` and `dynamic` as in `capture`. `rotate`:
    "auto" | "online" | "fold" | "off" (None: the recipe's default, see `Recipe.default_rotate`)."""
    if target.partition(":")[0] not in TARGETS:
        raise TargetError(f"unknown target {target!r}; choose one of: llvm, aarch64[:CPU], cuda[:sm_XX]")
    unknown = [e for e in emit if e not in EMITS]
    if unknown:
        raise TargetError(f"cannot emit {', '.join(unknown)} yet; available: {', '.join(EMITS)}")
    recipe = get_recipe(format)
    if "tvm" in emit:
        _check_target(target, recipe)  # before any work: a format the target cannot run is refused
    rotate = rotate or recipe.default_rotate
    if rotate not in ROTATE_MODES:
        raise LpcompileError(f"unknown rotate mode {rotate!r}; choose one of: {', '.join(ROTATE_MODES)}")
    stages: dict[str, float] = {}
    done: list[str] = []

    def stage(name):
        return _Stage(name, stages, done)

    with stage("capture"):
        float_model = capture(model, example_inputs, dynamic)
        # Quantizing reads every weight anyway; reading external data now keeps the float
        # reference and its copy independent of the files they came from.
        ir.external_data.load_to_model(float_model)
    if not find_linear_layers(float_model.graph):
        raise PassError("the model has no linear layers (MatMul/Gemm/Gather with constant weights) to quantize")
    with stage("load calibration"):
        data = as_calibration_data(calibration, float_model) if calibration is not None else None
    if data is None and recipe.needs_calibration:
        raise LpcompileError(f"format {format!r} needs calibration data (--calibration FILE.npz|DIR|random:N)")
    qdq = ir.from_proto(ir.to_proto(float_model))  # a deep copy: the float model stays the reference
    if rotate != "off":
        with stage("rotate"):  # before calibration: the statistics must be of rotated activations
            # with data, the pass also measures every linear input's outliers before and after
            Rotate(mode=rotate, data=data, batch_size=batch_size)(qdq)
    # Per-layer errors compare each layer with its float self in the same basis: a folded rotation
    # changes what intermediate tensors hold (exactly, up to fp rounding), never the outputs.
    reference = ir.from_proto(ir.to_proto(qdq)) if rotate != "off" else float_model
    if data is not None:
        with stage("calibrate"):
            gram_for = None if recipe.method == "gptq" else frozenset()
            Calibrate(data, batch_size, gram_for, _step(progress, "calibrate"))(qdq)
    with stage("quantize"):
        Quantize(recipe.weights, recipe.activations, recipe.embeddings, recipe.method, tuple(exclude),
                 progress=_step(progress, "quantize"))(qdq)
        Cleanup()(qdq)
    cal = qdq.meta.get(CALIBRATION_KEY)
    cal_info = None if cal is None else {
        "source": cal.source, "samples": cal.num_samples, "is_random": cal.is_random, "seconds": round(cal.seconds, 3)
    }
    with stage("measure"):
        batches = data.batches(batch_size) if data is not None else []
        report = build_report(reference, qdq, batches, format=format, target=target, calibration=cal_info,
                              stages=stages, excluded=list(exclude))
    report["recipe"] = {"weights": str(recipe.weights), "activations": str(recipe.activations) if recipe.activations else None,
                        "embeddings": str(recipe.embeddings) if recipe.embeddings else None, "method": recipe.method,
                        "description": recipe.description}
    report["stages_seconds"] = {k: round(v, 3) for k, v in stages.items()}
    report["rotate"] = {"mode": rotate, **_rotation_summary(qdq.meta.get(ROTATE_KEY))}
    return CompiledModel(qdq, report, recipe, target, tuple(emit))


def _check_target(target: str, recipe) -> None:
    from lpcompile.backends.tvm.target import FP8_MIN_SM, resolve, supports_fp8

    tvm_target = resolve(target)
    specs = [s for s in (recipe.weights, recipe.activations, recipe.embeddings) if s is not None]
    if any(getattr(s.format, "name", "").startswith("fp8") for s in specs) and not supports_fp8(tvm_target):
        raise TargetError(f"format {recipe.name!r} needs FP8 kernels: CUDA sm_{FP8_MIN_SM}+ (target {target}); "
                          f"use --target cuda:sm_89 or cuda:sm_90")


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


def _step(progress: Progress | None, name: str):
    if progress is None:
        return None
    return lambda i, n: progress(name, i, n)


class _Stage:
    """Times a stage; on failure names the stages that already ran."""

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
        if isinstance(exc, LpcompileError):
            return False
        ran = ", ".join(self.done) or "nothing"
        raise PassError(f"{self.name} failed after [{ran}]: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
