"""Whole models, batch 1 and 16, 2 threads, side by side in one run: lpcompile's TVM artifacts
(int4, w4a8 and int8 recipes, `lpcompile.runtime`) against onnxruntime on the float model and on
onnxruntime's own quantized models (quantize_dynamic int8 per-channel; MatMulNBits int4, block
128, accuracy level 4 — its fastest, which rounds activations to int8 per block: the like of
lpcompile's w4a8, while lpcompile's int4 keeps float activations), on the real all-MiniLM-L6-v2 and the LLaMA-shaped model
(models/llama.py `small`, ~130 M parameters, planted outlier channels).

Each (model, batch) takes held-out inputs of `--seq` tokens. Timing: the implementations take
turns in rounds (warm-up call, then `--reps` timed calls each, a short pause between, so load
from other users of the machine and other runtimes' spinning threads hit them alike); the figure
is the median latency in milliseconds. Artifacts and onnxruntime models are built once into
`--work` (compile times recorded).

    python benchmarks/bench_whole_models.py          # writes benchmarks/results/whole_models.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

THREADS = 2
os.environ.setdefault("TVM_NUM_THREADS", str(THREADS))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import numpy as np  # noqa: E402

PAUSE_S = 0.2
FORMATS = ("int4", "w4a8", "int8")
MODELS = {"minilm": ["minilm"], "llama-small": ["llama-small", "--outliers"]}


def ort_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_models(float_path: Path, work: Path) -> dict[str, Path]:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = work / "ort_pre.onnx"
    dyn, nbits = work / "ort_dynamic_int8.onnx", work / "ort_matmulnbits_int4.onnx"
    if not pre.exists():
        quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)
    if not dyn.exists():
        quantize_dynamic(str(pre), str(dyn), per_channel=True, weight_type=QuantType.QInt8)
    if not nbits.exists():
        q = MatMulNBitsQuantizer(str(pre), bits=4, block_size=128, is_symmetric=True, accuracy_level=4)
        q.process()
        q.model.save_model_to_file(str(nbits), use_external_data_format=False)
    return {"ort_fp32": float_path, "ort_dynamic_int8": dyn, "ort_matmulnbits_int4": nbits}


def prepare(name: str, work: Path) -> tuple[Path, dict[str, float]]:
    """Export the model and compile the lpcompile artifacts (once); returns (dir, compile seconds)."""
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    onnx_path = d / "model.onnx"
    if not onnx_path.exists():
        subprocess.run([sys.executable, "-m", "models.export", *MODELS[name][:1], str(onnx_path.resolve()), *MODELS[name][1:]],
                       check=True, cwd=Path(__file__).resolve().parents[1])  # models/ lives in the repository root
    cal = d / "model.calib" if (d / "model.calib").is_dir() else d / "model.calib.npz"
    seconds = {}
    for fmt in FORMATS:
        out = d / f"lpc-{fmt}"
        if not (out / "manifest.json").exists():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "lpcompile.cli", str(onnx_path), "--format", fmt, "--calibration", str(cal),
                            "--emit", "onnx,tvm", "-o", str(out), "--quiet"], check=True)
            seconds[fmt] = round(time.perf_counter() - t0, 1)
    return d, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--work", default="build/bench_models")
    p.add_argument("-o", "--output", default="benchmarks/results/whole_models.json")
    args = p.parse_args()

    from lpcompile import runtime

    work = Path(args.work)
    results = {"host": platform.processor() or platform.machine(), "threads": THREADS, "seq": args.seq, "models": {}}
    for name in args.models:
        d, compile_s = prepare(name, work)
        impls = {f"lpcompile_{fmt}": runtime.load(d / f"lpc-{fmt}") for fmt in FORMATS}
        sessions = {k: ort_session(v) for k, v in ort_models(d / "model.onnx", d).items()}
        input_names = impls["lpcompile_int4"].input_names
        with np.load(d / "model.eval.npz") as ev:
            data = {k: ev[k] for k in input_names}
        entry = {"compile_seconds": compile_s,
                 "kernels": {fmt: sorted({l["kernel"] for l in impls[f"lpcompile_{fmt}"].manifest["layers"]}) for fmt in FORMATS},
                 "batches": {}}
        for batch in args.batches:
            feeds = {k: np.ascontiguousarray(np.resize(v, (batch, v.shape[1]))[:, : args.seq]) for k, v in data.items()}
            calls = {k: (lambda m=m: m.run(feeds)) for k, m in impls.items()}
            calls.update({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()})
            times = {k: [] for k in calls}
            for _ in range(args.rounds):
                for k, f in calls.items():
                    f()
                    for _ in range(args.reps):
                        t0 = time.perf_counter()
                        f()
                        times[k].append(time.perf_counter() - t0)
                    time.sleep(PAUSE_S)
            ms = {k: round(float(np.median(v)) * 1e3, 2) for k, v in times.items()}
            best_ort = min(v for k, v in ms.items() if k.startswith("ort_"))
            entry["batches"][str(batch)] = {"p50_ms": ms, **{f"lpcompile_{fmt}_speedup_vs_best_ort": round(best_ort / ms[f"lpcompile_{fmt}"], 2)
                                                             for fmt in FORMATS}}
            print(f"{name} batch {batch} x {args.seq}: {ms}", flush=True)
        results["models"][name] = entry
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
