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

Latency (`--parts latency`, results in select_latency.json): the sum of the linear layers' kernel
latencies as the TVM backend measures them on this CPU (`backends.tvm.latency`: the kernels the
lowering emits, warm cache, median of 5; embedding gathers and online Hadamard transforms not
counted) at `--latency-tokens` rows (default 16: one sentence of typical length; the MiniLM
calibration sentences' median is 14 tokens). Every uniform recipe's sum and fp32's; then auto
with `--budget-latency` halfway between uniform int4 and fp32, and equal to the uniform int4, w4a8
and int8 sums, each evaluated on the held-out data like the rest.

    .venv/bin/python benchmarks/select_auto.py --models minilm --parts latency
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
from lpcompile.plan import Plan  # noqa: E402
from lpcompile.calibration_data import as_calibration_data  # noqa: E402
from lpcompile.ir import load_model  # noqa: E402
from lpcompile.report import measure_error  # noqa: E402
from lpcompile.goals import Bits, Latency, MinCosine  # noqa: E402

UNIFORM = ["int4", "w4a8", "w8a16", "int8", "fp8"]
MIN_COSINE = 0.995
LATENCY_TOKENS = 16


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
            art = lpcompile.compile(str(path), format="auto", goal=Bits(budget), calibration=calib, rotate=rotate,
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
    art = lpcompile.compile(str(path), format="auto", goal=MinCosine(MIN_COSINE), calibration=calib, plan=plans["auto"])
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


def run_latency(name: str, path: Path, calib: str, eval_path: Path, tokens: int, whole: Path | None = None) -> dict:
    """Uniform recipes and auto under latency budgets: kernel latency sums and held-out accuracy;
    with `whole` (a work directory) also each whole model as a TVM artifact at one sentence of
    `tokens` tokens, to see whether the kernel sums order the models as their real latency does."""
    from lpcompile.api import _linear_shape
    from lpcompile.backends.tvm.latency import LatencyModel
    from lpcompile.ir.patterns import find_linear_layers
    from lpcompile.recipes import get_recipe

    float_model = load_model(str(path))
    layers = find_linear_layers(float_model.graph)
    params = sum(l.in_features * l.out_features for l in layers)
    shapes = [_linear_shape(l, tokens) for l in layers if l.kind != "embedding"]
    model = LatencyModel("llvm")
    t = time.perf_counter()
    table = model.table([(s, w, a) for s in shapes for w, a in
                         [(None, None)] + [(get_recipe(f).weights, get_recipe(f).activations) for f in UNIFORM]])

    def uniform_us(w, a) -> float:
        return sum(table[(s, str(w) if w else "float", str(a) if a else "float")] for s in shapes)

    result = {"tokens": tokens, "linear_layers_timed": len(shapes), "cache": str(model.path),
              "kernels_timed_now": model.built, "timing_seconds": round(time.perf_counter() - t, 1),
              "uniform": {"fp32": {"latency_us": uniform_us(None, None), "avg_weight_bits": 32.0, "cosine_mean": 1.0,
                                   "cosine_min": 1.0, "sqnr_db": None}}, "auto": {}}
    print(f"{name:12s} uniform fp32: kernels {result['uniform']['fp32']['latency_us']:.0f} us at {tokens} tokens",
          flush=True)

    arts = {}

    def record(label, art, seconds, us, **extra):
        arts[label] = art
        r = held_out(float_model, art.qdq_model, eval_path)
        r.update(latency_us=us, avg_weight_bits=avg_weight_bits(art.report, params), compile_seconds=round(seconds, 1),
                 online_hadamards=len(art.report.get("rotate", {}).get("online", [])), **extra)
        print(f"{name:12s} {label:40s} kernels {us:8.1f} us  {r['avg_weight_bits']:6.3f} bits  cosine "
              f"{r['cosine_mean']:.5f} (min {r['cosine_min']:.4f})  SQNR {r['sqnr_db']:6.2f} dB  [{seconds:.0f} s]",
              flush=True)
        return r

    for fmt in UNIFORM:
        recipe = get_recipe(fmt)
        t = time.perf_counter()
        art = lpcompile.compile(str(path), format=fmt, calibration=calib)
        result["uniform"][fmt] = record(f"uniform {fmt}", art, time.perf_counter() - t,
                                        uniform_us(recipe.weights, recipe.activations))
    u = result["uniform"]
    budgets = {"halfway between uniform int4 and fp32": 0.5 * (u["int4"]["latency_us"] + u["fp32"]["latency_us"]),
               **{f"= uniform {f}": u[f]["latency_us"] for f in ("int4", "w4a8", "int8")}}
    plan = None
    for label, budget in budgets.items():
        t = time.perf_counter()
        art = lpcompile.compile(str(path), format="auto", goal=Latency(budget, tokens=tokens),
                                calibration=calib, plan=plan)
        plan = plan or art.plan  # the sensitivity, measured once
        sel = art.report["select"]
        pairs: dict[str, int] = {}
        for r in sel["layers"]:
            key = f"{r['weights']} x {r['activations']}"
            pairs[key] = pairs.get(key, 0) + 1
        result["auto"][label] = record(
            f"auto --budget-latency {budget:.0f} ({label})", art, time.perf_counter() - t, sel["achieved"]["latency_us"],
            budget_us=budget, budget_met=sel["achieved"]["budget_met"], formats=pairs,
            predicted_cosine=sel["predicted"]["predicted_cosine"])
    if whole is not None:
        arts["uniform fp32"] = lpcompile.compile(str(path), format="auto", calibration=calib, rotate="off",
                                                 plan=Plan([], pins={"*": {"weights": "float"}}))
        result["whole_model_ms"] = whole_model_latency(arts, whole / name, eval_path, tokens)
    return result


def whole_model_latency(arts: dict, work: Path, eval_path: Path, tokens: int) -> dict:
    """Each model as a TVM artifact in `work`, timed by `time_models` on one held-out sentence cut
    to `tokens` tokens (batch 1)."""
    import dataclasses

    from lpcompile import runtime

    models = {}
    for i, (label, art) in enumerate(arts.items()):
        t = time.perf_counter()
        dataclasses.replace(art, emit=("onnx", "tvm")).save(work / f"m{i}")
        models[label] = runtime.load(work / f"m{i}")
        print(f"  tvm artifact for {label}: {time.perf_counter() - t:.0f} s", flush=True)
    with np.load(eval_path) as ev:
        feeds = {k: np.ascontiguousarray(ev[k][:1, :tokens]) for k in next(iter(models.values())).input_names}
    ms = time_models(models, feeds)
    print(f"  whole model, 1 x {tokens} tokens, median ms: {ms}", flush=True)
    return ms


def time_models(models: dict, feeds: dict, rounds: int = 20, reps: int = 10) -> dict:
    """Median ms of a call per model, the models taking turns (a pause between rounds) so that load
    from other users of the machine hits them alike."""
    times = {k: [] for k in models}
    for _ in range(rounds):
        for label, m in models.items():
            m.run(feeds)
            for _ in range(reps):
                t0 = time.perf_counter()
                m.run(feeds)
                times[label].append(time.perf_counter() - t0)
            time.sleep(0.1)
    return {k: round(float(np.median(v)) * 1e3, 3) for k, v in times.items()}


def latency_markdown(results: dict) -> str:
    lines = ["| model | quantization | kernel latency us (tokens) | whole model ms (1 sentence) | avg weight bits | "
             "held-out cosine (mean / min) | held-out SQNR dB |", "|---|---|---|---|---|---|---|"]
    for model, r in results["models"].items():
        whole = r.get("whole_model_ms") or {}
        rows = [(f"uniform {k}", v, whole.get(f"uniform {k}")) for k, v in r["uniform"].items()]
        rows += [(f"auto {k}", v, next((ms for w, ms in whole.items() if w.startswith("auto") and w.endswith(f"({k})")),
                                        None)) for k, v in r["auto"].items()]
        for label, v, ms in sorted(rows, key=lambda x: x[1]["latency_us"]):
            sq = "-" if v["sqnr_db"] is None else f"{v['sqnr_db']:.2f}"
            lines.append(f"| {model} | {label} | {v['latency_us']:.1f} ({r['tokens']}) | {'-' if ms is None else ms} | "
                         f"{v['avg_weight_bits']:.3f} | {v['cosine_mean']:.5f} / {v['cosine_min']:.4f} | {sq} |")
    return "\n".join(lines) + "\n"


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
    ap.add_argument("--parts", default="bits,latency", help="bits (select_auto.json), latency (select_latency.json)")
    ap.add_argument("--latency-tokens", type=int, default=LATENCY_TOKENS)
    ap.add_argument("--latency-out", default=str(ROOT / "benchmarks/results/select_latency.json"), type=os.path.abspath)
    ap.add_argument("--whole-model", action="store_true",
                    help="latency part: also time each model whole as a TVM artifact (minutes more)")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    work = Path(args.work or tempfile.mkdtemp(prefix="select-auto-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = {"min_cosine": MIN_COSINE, "machine": platform.processor() or platform.machine(),
               "threads": os.environ.get("OMP_NUM_THREADS"), "models": {}}
    latency = {"machine": _cpu(), "threads": os.environ.get("TVM_NUM_THREADS") or len(os.sched_getaffinity(0)),
               "models": {}}
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
        if "bits" in parts:
            results["models"][name] = run_model(name, path, calib, ev, work)
        if "latency" in parts:
            load = os.getloadavg()[0]
            latency["models"][name] = run_latency(name, path, calib, ev, args.latency_tokens,
                                                  work / "whole" if args.whole_model else None)
            # (the host is shared: a 1-minute load above this run's own 2 threads means contended timings)
            latency["models"][name]["load_average_1min"] = {"start": load, "end": os.getloadavg()[0]}
    for out, res, md in ((args.out, results, markdown), (args.latency_out, latency, latency_markdown)):
        if res["models"]:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(res, indent=2))
            Path(out).with_suffix(".md").write_text(md(res))
            print(md(res))
    return 0


def _cpu() -> str:
    from lpcompile.backends.tvm.target import host_target

    return str(host_target().attrs["mcpu"])


if __name__ == "__main__":
    sys.exit(main())
