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

Issue 12's side-by-side run adds OpenVINO (`--peers openvino`: its default fp32 hint, and NNCF's
int8 post-training quantization of the float model, calibrated on the calibration inputs),
shapes as batch x tokens (`--shapes 1x32 1x128 16x64`), more lpcompile artifacts by name
(`--extra lpcompile_int8_generic=DIR`, e.g. one built before a kernel change, timed in the same
rounds), the CPU's name and flags, each runtime's cosine to onnxruntime fp32 on the real held-out
sentences, and ratios of each lpcompile artifact to the fastest peer:

    python benchmarks/bench_whole_models.py --models minilm --model-dir minilm=/tmp/minilm \
        --shapes 1x32 1x128 16x64 --peers openvino -o benchmarks/results/whole_models_zen2.json
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


def cpu_info() -> dict:
    """The CPU's model name and the SIMD flags that decide kernels (as /proc/cpuinfo lists them)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    import tvm

    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return {"name": name, "llvm_cpu": str(tvm.target.codegen.llvm_get_system_cpu()),
            "flags": [f for f in wanted if f in flags]}


def openvino_models(float_path: Path, calib: Path, work: Path, input_names: list[str]) -> dict:
    """OpenVINO's default fp32 (its default hint: bf16 where the CPU has AMX) and NNCF's int8
    (post-training, transformer preset, calibrated on up to 128 calibration rows)."""
    import nncf
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": THREADS}
    int8_xml = work / "ov_nncf_int8.xml"
    if not int8_xml.exists():
        with np.load(calib) as c:
            rows = [{k: c[k][i:i + 1] for k in input_names} for i in range(min(128, len(c[input_names[0]])))]
        quantized = nncf.quantize(core.read_model(str(float_path)), nncf.Dataset(rows), subset_size=len(rows),
                                  model_type=nncf.ModelType.TRANSFORMER)
        ov.save_model(quantized, str(int8_xml))
    return {"openvino_fp32": core.compile_model(str(float_path), "CPU", config),
            "openvino_nncf_int8": core.compile_model(str(int8_xml), "CPU", config)}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


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
    p.add_argument("--model-dir", action="append", default=[], metavar="NAME=DIR",
                   help="use DIR (model.onnx, calibration/eval inputs, lpc-FORMAT artifacts) for model NAME")
    p.add_argument("--shapes", nargs="+", metavar="BxL", help="batch x tokens (replaces --batches / --seq)")
    p.add_argument("--peers", nargs="*", default=[], choices=["openvino"], help="more runtimes side by side")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=DIR", help="another lpcompile artifact to time")
    p.add_argument("-o", "--output", default="benchmarks/results/whole_models.json")
    args = p.parse_args()

    from lpcompile import runtime

    work = Path(args.work)
    dirs = dict(a.split("=", 1) for a in args.model_dir)
    shapes = ([tuple(int(v) for v in s.lower().split("x")) for s in args.shapes] if args.shapes
              else [(b, args.seq) for b in args.batches])
    results = {"host": platform.processor() or platform.machine(), "cpu": cpu_info(), "threads": THREADS,
               "seq": args.seq, "models": {}}
    for name in args.models:
        d, compile_s = (Path(dirs[name]), {}) if name in dirs else prepare(name, work)
        impls = {f"lpcompile_{fmt}": runtime.load(d / f"lpc-{fmt}") for fmt in FORMATS}
        impls.update({k: runtime.load(v) for k, v in (e.split("=", 1) for e in args.extra)})
        sessions = {k: ort_session(v) for k, v in ort_models(d / "model.onnx", d).items()}
        input_names = impls["lpcompile_int4"].input_names
        cal = d / "model.calib.npz"
        ov_models = openvino_models(d / "model.onnx", cal, d, input_names) if "openvino" in args.peers else {}
        with np.load(d / "model.eval.npz") as ev:
            data = {k: ev[k] for k in input_names}
        entry = {"compile_seconds": compile_s,
                 "kernels": {k: sorted({l["kernel"] for l in m.manifest["layers"]}) for k, m in impls.items()},
                 "rules": {k: m.manifest.get("lowering") for k, m in impls.items()},
                 "batches": {}}
        # accuracy: every runtime against onnxruntime fp32 on 16 real held-out sentences
        real = {k: np.ascontiguousarray(v[:16]) for k, v in data.items()}
        ref = sessions["ort_fp32"].run(None, real)[0]
        outs = {k: list(m.run(real).values())[0] for k, m in impls.items()}
        outs.update({k: s.run(None, real)[0] for k, s in sessions.items()})
        outs.update({k: next(iter(c(real).values())) for k, c in ov_models.items()})
        entry["cosine_vs_ort_fp32"] = {k: round(cosine(v, ref), 6) for k, v in outs.items()}
        print(f"{name} cosine vs ORT fp32: {entry['cosine_vs_ort_fp32']}", flush=True)
        for batch, seq in shapes:
            feeds = {k: np.ascontiguousarray(np.resize(v, (batch, seq))) for k, v in data.items()}
            calls = {k: (lambda m=m: m.run(feeds)) for k, m in impls.items()}
            calls.update({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()})
            calls.update({k: (lambda c=c: c(feeds)) for k, c in ov_models.items()})
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
            key = str(batch) if not args.shapes else f"{batch}x{seq}"
            entry["batches"][key] = {"p50_ms": ms, **{f"{k}_speedup_vs_best_ort": round(best_ort / ms[k], 2) for k in impls}}
            if ov_models:
                best_peer = min(v for k, v in ms.items() if k.startswith(("ort_", "openvino_")))
                entry["batches"][key].update({f"{k}_speedup_vs_best_peer": round(best_peer / ms[k], 2) for k in impls})
            print(f"{name} batch {batch} x {seq}: {ms}", flush=True)
            results["models"][name] = entry
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)  # written after every shape
            Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
