"""--format auto against every uniform recipe, on held-out data, at equal average weight bits.

    .venv/bin/python benchmarks/select_auto.py [--minilm build/minilm.onnx] [--out benchmarks/results/select_auto.json]

Models: the real all-MiniLM-L6-v2 (its length-bucketed calibration sentences; held-out sentences
for evaluation) and the LLaMA-shaped llama-tiny with planted outlier channels (exported here).
For each: every uniform recipe is compiled and evaluated; its average weight bits (scales and zero
points included, over all linear layers and embedding tables) become a `--budget` for auto; auto
also runs with `--min-cosine C`. Everything is calibrated on the calibration data and evaluated in
onnxruntime on the held-out data (cosine per sample between quantized and float output, mean and
min; SQNR over all values). The sensitivity is measured once per model and rotation mode and
reused from the plan for the other budgets (the cache plan.json carries). A run with rotation
off shows the FP8 exponent analysis where the outliers are still in the activations.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lpcompile  # noqa: E402
from lpcompile.calibration_data import as_calibration_data  # noqa: E402
from lpcompile.ir import load_model  # noqa: E402
from lpcompile.report import measure_error  # noqa: E402

UNIFORM = ["int4", "w4a8", "w8a16", "int8", "fp8"]
MIN_COSINE = 0.995


def held_out(float_model, qdq_model, eval_path: Path) -> dict:
    data = as_calibration_data(str(eval_path), float_model)
    _, outputs = measure_error(float_model, qdq_model, data.batches(16))
    err = next(iter(outputs.values()))
    cos = np.array(err.cosines)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "sqnr_db": float(err.sqnr_db)}


def avg_weight_bits(report: dict, params: int) -> float:
    """Stored bits of every linear weight and table over their parameter count (float ones at 32)."""
    if "select" in report:
        return report["select"]["achieved"]["avg_weight_bits"]
    quantized = sum(l["weight_bytes"] * 8 for l in report["layers"])
    q_params = sum(l["weight_bytes_fp32"] // 4 for l in report["layers"])
    return (quantized + 32 * (params - q_params)) / params


def run_model(name: str, path: Path, calib: str, eval_path: Path, work: Path) -> dict:
    from lpcompile.ir.patterns import find_linear_layers

    float_model = load_model(str(path))
    params = sum(l.in_features * l.out_features for l in find_linear_layers(float_model.graph))
    result = {"params": params, "uniform": {}, "auto": {}}

    def record(label, art, seconds, **extra):
        r = held_out(float_model, art.qdq_model, eval_path)
        r.update(avg_weight_bits=avg_weight_bits(art.report, params), compile_seconds=round(seconds, 1), **extra)
        print(f"{name:12s} {label:34s} {r['avg_weight_bits']:6.3f} bits  cosine {r['cosine_mean']:.5f} "
              f"(min {r['cosine_min']:.4f})  SQNR {r['sqnr_db']:6.2f} dB  [{seconds:.0f} s]", flush=True)
        return r

    for fmt in UNIFORM:
        t = time.perf_counter()
        art = lpcompile.compile(str(path), format=fmt, calibration=calib)
        result["uniform"][fmt] = record(f"uniform {fmt}", art, time.perf_counter() - t)
    plans = {}
    budgets = sorted({round(r["avg_weight_bits"], 4) for f, r in result["uniform"].items()})
    for rotate in ("auto", "off"):
        for budget in budgets if rotate == "auto" else budgets[:1]:
            t = time.perf_counter()
            art = lpcompile.compile(str(path), format="auto", budget=budget, calibration=calib, rotate=rotate,
                                    plan=plans.get(rotate))
            plans.setdefault(rotate, art.plan)
            sel = art.report["select"]
            extra = {"budget": budget, "rotate": rotate, "budget_met_on_calibration": sel["achieved"]["budget_met"],
                     "formats": _count(sel), "sensitivity_seconds": sel.get("measurement_seconds"),
                     "exponent_vs_outliers": sel["exponent_vs_outliers"]}
            if budget == budgets[0]:
                art.save(work / f"{name}-auto-{rotate}.lpc")
            result["auto"][f"budget {budget:.4f} rotate {rotate}"] = record(
                f"auto --budget {budget:.4f} (rotate {rotate})", art, time.perf_counter() - t, **extra)
    t = time.perf_counter()
    art = lpcompile.compile(str(path), format="auto", min_cosine=MIN_COSINE, calibration=calib, plan=plans["auto"])
    sel = art.report["select"]
    result["auto"][f"min-cosine {MIN_COSINE}"] = record(
        f"auto --min-cosine {MIN_COSINE}", art, time.perf_counter() - t, min_cosine=MIN_COSINE,
        formats=_count(sel), verification=sel["verification"])
    art.save(work / f"{name}-auto-min-cosine.lpc")
    meeting = {f: r["avg_weight_bits"] for f, r in result["uniform"].items() if r["cosine_mean"] >= MIN_COSINE}
    result["min_cosine_comparison"] = {
        "target": MIN_COSINE, "auto_bits": result["auto"][f"min-cosine {MIN_COSINE}"]["avg_weight_bits"],
        "auto_held_out_cosine": result["auto"][f"min-cosine {MIN_COSINE}"]["cosine_mean"],
        "uniform_recipes_meeting_it": meeting}
    return result


def _count(sel: dict) -> dict:
    counts: dict[str, int] = {}
    for r in sel["layers"]:
        counts[r["weights"]] = counts.get(r["weights"], 0) + 1
    return counts


def markdown(results: dict) -> str:
    lines = ["| model | quantization | avg weight bits | held-out cosine (mean / min) | held-out SQNR dB |",
             "|---|---|---|---|---|"]
    for model, r in results["models"].items():
        rows = [(f"uniform {k}", v) for k, v in r["uniform"].items()] + [(f"auto {k}", v) for k, v in r["auto"].items()]
        for label, v in sorted(rows, key=lambda x: x[1]["avg_weight_bits"]):
            lines.append(f"| {model} | {label} | {v['avg_weight_bits']:.3f} | {v['cosine_mean']:.5f} / "
                         f"{v['cosine_min']:.4f} | {v['sqnr_db']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minilm", default=str(ROOT / "build/minilm.onnx"),
                    help="exported MiniLM (python -m models.export minilm OUT.onnx), with OUT.calib/ and OUT.eval.npz")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/select_auto.json"), type=os.path.abspath)
    ap.add_argument("--work", default=None)
    ap.add_argument("--models", default="llama-tiny-outliers,minilm")
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="select-auto-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = {"min_cosine": MIN_COSINE, "machine": platform.processor() or platform.machine(),
               "threads": os.environ.get("OMP_NUM_THREADS"), "models": {}}
    for name in args.models.split(","):
        if name == "minilm":
            path = Path(args.minilm)
            calib, ev = str(path.with_name(path.stem + ".calib")), path.with_name(path.stem + ".eval.npz")
        elif name == "llama-tiny-outliers":
            path = work / "llama.onnx"
            if not path.exists():
                subprocess.run([sys.executable, "-m", "models.export", "llama-tiny", "--outliers", str(path)],
                               check=True, cwd=ROOT)
            calib, ev = str(work / "llama.calib.npz"), work / "llama.eval.npz"
        else:
            raise SystemExit(f"unknown model {name}")
        results["models"][name] = run_model(name, path, calib, ev, work)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    Path(args.out).with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
