"""Whole models compiled for CUDA, run on a real GPU: correctness against onnxruntime, latency.

Two steps, because the GPU machine has TVM's runtime but not its compiler:

    python benchmarks/gpu_models.py build DIR [--arch sm_90]   # here: artifacts + reference outputs
    python benchmarks/gpu_models.py run DIR [-o results.json]  # on the GPU: lpcompile.runtime, torch

`build` compiles every recipe of the small CNN and the LLaMA-shaped model (tiny, planted outlier
channels) and the int8 recipe of the real all-MiniLM-L6-v2 for `--arch` (nvcc fatbins
inside each artifact), and runs onnxruntime (CPU, graph optimizations off) on each recipe's QDQ
model and on the float model for batch 1 and 16 of held-out inputs.

`run` loads each artifact with `lpcompile.runtime.load` on the GPU, compares its outputs with
onnxruntime's on the same QDQ model, and times it (p50 of 100 calls, inputs already on the GPU).
Weight-only recipes must match to fp32 rounding (1e-4 relative); where activations are quantized a
value within rounding noise of a step may land on the other side on another processor, so the test
is the one of the CPU backend tests over the batch of 16: in cosine distance, the GPU's distance to
onnxruntime is under half of the quantization's own (onnxruntime's to the float model), and the GPU
is as far from the float model as onnxruntime (within 10%); one sample is too few for that
statistic (a flip early in MiniLM int8 moves its single output as much on this CPU backend), so
batch 1 must only be no farther than 1.5x onnxruntime from the float model. The GPU baseline is torch
(eager fp32 and fp16) on the same modules (`models/`, same seeds: its fp32 output is checked
against the float model's); MiniLM has no torch baseline there (its weights are not on that machine).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from gpu_common import two_step_parser  # a sibling script: benchmarks/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]

ALL = ("int4", "w8a16", "int8", "w4a8", "w4a4", "fp8", "fp8-e5m2")
WEIGHT_ONLY = ("int4", "w8a16")
MODELS = {
    "cnn": (["cnn"], ALL),
    "llama-tiny": (["llama-tiny", "--outliers"], ALL),
    "minilm": (["minilm"], ("int8",)),
}
CHECKED_ROWS = {"llama-tiny": 4}  # rows of logits kept for the check (rows are independent), else all
BATCHES = (1, 16)
SEQ = {"llama-tiny": 32, "minilm": 64}
RUNTIME_FILES = ("model.so", "params.bin", "manifest.json")


def _feeds(model: str, data: dict, batch: int) -> dict:
    seq = SEQ.get(model)
    return {k: np.ascontiguousarray(v[:batch, :seq] if seq else v[:batch]) for k, v in data.items()}


def _ort(path: Path, feeds: dict) -> list:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def build(out: Path, arch: str, work: Path, minilm: Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {"arch": arch, "artifacts": [], "compile_seconds": {}}
    for model, (export_args, formats) in MODELS.items():
        d = work / model
        d.mkdir(parents=True, exist_ok=True)
        onnx_path = d / "model.onnx"
        if model == "minilm" and minilm is not None:
            onnx_path = minilm
        elif not onnx_path.exists():
            subprocess.run([sys.executable, "-m", "models.export", export_args[0], str(onnx_path.resolve()), *export_args[1:]],
                           check=True, cwd=ROOT)  # models/ lives in the repository root, not installed
        stem = onnx_path.with_suffix("")
        cal = Path(f"{stem}.calib") if Path(f"{stem}.calib").is_dir() else Path(f"{stem}.calib.npz")
        with np.load(f"{stem}.eval.npz") as ev:
            data = {k: ev[k] for k in ev.files}
        refs = {}
        for batch in BATCHES:
            feeds = _feeds(model, data, batch)
            refs.update({f"b{batch}/in/{k}": v for k, v in feeds.items()})
            refs[f"b{batch}/float"] = _ort(onnx_path, feeds)[0][:CHECKED_ROWS.get(model)]
        for fmt in formats:
            art = d / f"cuda-{fmt}"
            if not (art / "manifest.json").exists():
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "lpcompile.cli", str(onnx_path), "--target", f"cuda:{arch}", "--format", fmt,
                                "--calibration", str(cal), "--emit", "onnx,tvm", "-o", str(art), "--quiet",
                                "--qdq-functions"], check=True)  # gpu_probe lowers this file: the form TVM fuses
                meta["compile_seconds"][f"{model}-{fmt}"] = round(time.perf_counter() - t0, 1)
            dest = out / f"{model}-{fmt}"
            dest.mkdir(exist_ok=True)
            manifest = json.loads((art / "manifest.json").read_text())
            for f in [*RUNTIME_FILES, *(b["file"] for b in manifest["cuda_binaries"])]:
                shutil.copy2(art / f, dest / f)
            for batch in BATCHES:
                refs[f"b{batch}/{fmt}"] = _ort(art / "model.qdq.onnx", {k[len(f"b{batch}/in/"):]: v for k, v in refs.items()
                                                                         if k.startswith(f"b{batch}/in/")})[0][:CHECKED_ROWS.get(model)]
            meta["artifacts"].append({"model": model, "format": fmt, "dir": dest.name,
                                      "kernels": sorted({l["kernel"] for l in manifest["layers"] if l.get("kernel")}),
                                      "status": sorted({l["status"] for l in manifest["layers"]})})
            print(f"{model} {fmt}: {dest}", flush=True)
        np.savez_compressed(out / f"{model}.refs.npz", **refs)
    (out / "models.json").write_text(json.dumps(meta, indent=1))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-30))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of the rows (samples)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())


def _torch_module(model: str):
    if str(ROOT) not in sys.path:  # models/ lives in the repository root, not installed
        sys.path.insert(0, str(ROOT))
    from models.llama import LlamaConfig, build_llama
    from models.small import build_cnn

    if model == "cnn":
        return build_cnn(0)
    if model == "llama-tiny":
        return build_llama(LlamaConfig.tiny().with_outliers())
    return None


def _cuda_time_ms(fn, reps: int = 100) -> float:
    import torch

    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def run(out: Path, result_path: Path) -> int:
    import torch

    from lpcompile import runtime

    meta = json.loads((out / "models.json").read_text())
    results, failures = [], 0
    refs = {m: np.load(out / f"{m}.refs.npz") for m in MODELS if (out / f"{m}.refs.npz").exists()}
    for a in meta["artifacts"]:
        model, fmt = a["model"], a["format"]
        r = refs[model]
        entry = {"model": model, "format": fmt, "kernels": a["kernels"], "batches": {}}
        try:
            m = runtime.load(out / a["dir"])
        except Exception as e:  # noqa: BLE001 - one broken artifact is reported, the others still run
            entry["error"] = f"{type(e).__name__}: {e}"
            failures += 1
            results.append(entry)
            print(f"FAIL {model} {fmt}: {entry['error']}", flush=True)
            continue
        for batch in BATCHES:
            feeds = {k.split("/")[-1]: r[k] for k in r.files if k.startswith(f"b{batch}/in/")}
            got = m.run(feeds)[m.output_names[0]][:CHECKED_ROWS.get(model)]
            ort_q, ort_f = r[f"b{batch}/{fmt}"], r[f"b{batch}/float"]
            gpu_vs_ort, ort_vs_float, gpu_vs_float = _rel(got, ort_q), _rel(ort_q, ort_f), _rel(got, ort_f)
            if fmt in WEIGHT_ONLY:
                ok = gpu_vs_ort <= 1e-4
            else:  # the CPU backend's test (tests/backends/test_whole_models.py), in cosine distance,
                # over the batch of 16; a single sample only must not be much farther from float
                d_gpu_ort, d_gpu_float, d_ort_float = 1 - _cos(got, ort_q), 1 - _cos(got, ort_f), 1 - _cos(ort_q, ort_f)
                ok = (d_gpu_ort <= 0.5 * d_ort_float and abs(d_gpu_float - d_ort_float) <= 0.1 * d_ort_float + 1e-5
                      if batch > 1 else d_gpu_float <= 1.5 * d_ort_float + 1e-5)
            ok = ok and bool(np.isfinite(got).all())
            failures += not ok
            bench = m.benchmark(inputs=feeds, warmup=10, repeat=100)
            entry["batches"][str(batch)] = {"ok": ok, "gpu_vs_ort": gpu_vs_ort, "ort_vs_float": ort_vs_float,
                                            "gpu_vs_float": gpu_vs_float, "p50_ms": bench["p50_ms"], "p90_ms": bench["p90_ms"]}
            print(f"{'ok  ' if ok else 'FAIL'} {model:<10} {fmt:<8} b{batch:<3} |gpu-ort|/|ort| {gpu_vs_ort:.2e} "
                  f"(|ort-float|/|float| {ort_vs_float:.2e})  p50 {bench['p50_ms']:.3f} ms", flush=True)
        results.append(entry)
    baselines = {}
    for model in MODELS:
        module = _torch_module(model)
        if module is None or model not in refs:
            continue
        r = refs[model]
        module = module.cuda().eval()
        for batch in BATCHES:
            feeds = [torch.from_numpy(r[k]).cuda() for k in sorted(r.files) if k.startswith(f"b{batch}/in/")]
            with torch.no_grad():
                y32 = module(*feeds)
                y32 = (y32[0] if isinstance(y32, tuple) else y32).float().cpu().numpy()[:CHECKED_ROWS.get(model)]
                t32 = _cuda_time_ms(lambda: module(*feeds))
                half = module.half()
                f16 = [f.half() if f.is_floating_point() else f for f in feeds]
                t16 = _cuda_time_ms(lambda: half(*f16))
                module.float()
            baselines[f"{model}/b{batch}"] = {"torch_fp32_p50_ms": t32, "torch_fp16_p50_ms": t16,
                                              "torch_fp32_vs_float_model": _rel(y32, r[f"b{batch}/float"])}
            print(f"torch {model} b{batch}: fp32 {t32:.3f} ms, fp16 {t16:.3f} ms, "
                  f"|torch-onnx float|/|float| {baselines[f'{model}/b{batch}']['torch_fp32_vs_float_model']:.2e}", flush=True)
    result = {"device": torch.cuda.get_device_name(0), "arch": meta["arch"], "failures": failures,
              "artifacts": results, "torch_baselines": baselines, "compile_seconds": meta["compile_seconds"]}
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1))
    print(f"{failures} failures; results -> {result_path}")
    return 1 if failures else 0


def main(argv=None) -> int:
    p, b, _ = two_step_parser(__doc__, "benchmarks/results/gpu_models.json")
    b.add_argument("--work", default="build/gpu_models")
    b.add_argument("--minilm", help="an exported all-MiniLM-L6-v2 (python -m models.export minilm F), with its sidecars")
    args = p.parse_args(argv)
    if args.cmd == "build":
        build(Path(args.dir), args.arch, Path(args.work), Path(args.minilm) if args.minilm else None)
        return 0
    return run(Path(args.dir), Path(args.output))


if __name__ == "__main__":
    sys.exit(main())
