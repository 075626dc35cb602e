"""A whole CNN with its convolutions quantized, side by side in one run: lpcompile's TVM artifacts
(int8 = W8A8 static, int4 = W4A16 blocks) against onnxruntime (float; its own static QDQ int8,
per-channel weights, QUInt8 activations, run by its default session, which fuses QLinearConv) and
OpenVINO (float; NNCF post-training int8), 2 threads, batch 1.

The model is a ResNet-18-shaped `transformers` ResNet (basic blocks, widths 64-512, depths
2-2-2-2) with random weights, built from its config (nothing downloaded) and exported with
torch.onnx (BatchNorm folded into the convs), at `--image` pixels. All tools calibrate on the same
random images; every output is compared with the float model's (cosine, mean over held-out
images), and the weight bytes of each lpcompile recipe are reported against fp32.

Timing: the implementations take turns in rounds (warm-up, then `--reps` timed calls each, a
short pause between), so load from other users of the machine hits them alike; the figure is the
median latency in milliseconds. Ratios are against onnxruntime float in the same run.

    python benchmarks/bench_cnn.py --prepare   # export and compile (slow; no timing)
    flock /tmp/lpcompile-bench.lock python benchmarks/bench_cnn.py   # writes benchmarks/results/cnn.json
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PAUSE_S = 0.1
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu() -> dict:
    text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = set(info.get("Flags", "").split())
    return {"model": info.get("Model name", platform.processor()).strip(), "flags": [f for f in FLAGS if f in flags]}


def export_resnet(path: Path, image: int) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=64, hidden_sizes=[64, 128, 256, 512],
                                    depths=[2, 2, 2, 2], layer_type="basic", num_labels=1000)
    inner = transformers.ResNetForImageClassification(cfg).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in inner.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = inner

        def forward(self, x):
            return self.m(pixel_values=x).logits

    x = torch.randn(1, 3, image, image)
    prog = torch.onnx.export(Logits().eval(), (x,), dynamo=True, input_names=["x"], output_names=["logits"])
    prog.save(str(path))


def images(n: int, image: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 3, image, image)).astype(np.float32)


def ort_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_static_int8(float_path: Path, out: Path, calib: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter({"x": c} for c in calib)

        def get_next(self):
            return next(self.it, None)

    pre = out.with_name("ort_pre.onnx")
    quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def openvino_models(float_path: Path, calib: np.ndarray):
    import nncf
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY"}
    model = core.read_model(str(float_path))
    fp32 = core.compile_model(model, "CPU", config)
    q = nncf.quantize(core.read_model(str(float_path)), nncf.Dataset(list(calib)), subset_size=len(calib))
    int8 = core.compile_model(q, "CPU", config)
    return (lambda x: fp32(x)[0]), (lambda x: int8(x)[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lpcompile-bench-cnn"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cnn.json")
    ap.add_argument("--prepare", action="store_true",
                    help="only export, compile and quantize into --work (no timing: needs no benchmark lock)")
    args = ap.parse_args(argv)
    import lpcompile
    from lpcompile import runtime

    args.work.mkdir(parents=True, exist_ok=True)
    float_path = args.work / "resnet18.onnx"
    times: dict[str, float] = {}
    if not float_path.exists():
        t = time.perf_counter()
        export_resnet(float_path, args.image)
        times["export"] = time.perf_counter() - t
    calib = images(args.n_calib, args.image, 1)
    held = images(4, args.image, 2)
    runners, notes, weights = {}, {}, {}
    ref = ort_session(float_path)
    runners["onnxruntime fp32"] = lambda x, s=ref: s.run(None, {"x": x})[0]
    for fmt in ("int8", "int4"):
        out = args.work / f"lpc_{fmt}"
        t = time.perf_counter()
        if not (out / "manifest.json").exists():
            art = lpcompile.compile(str(float_path), format=fmt, calibration=[{"x": c} for c in calib],
                                    emit=("onnx", "tvm"))
            art.save(out)
            times[f"lpcompile {fmt} compile"] = time.perf_counter() - t
        report = json.loads((out / "report.json").read_text())["totals"]
        manifest = json.loads((out / "manifest.json").read_text())
        status = {}
        for layer in manifest["layers"]:
            status[layer["status"]] = status.get(layer["status"], 0) + 1
        weights[f"lpcompile {fmt}"] = {"weight_bytes": report["weight_bytes"], "fp32": report["weight_bytes_fp32"],
                                       "ratio": report["weight_bytes"] / report["weight_bytes_fp32"],
                                       "layers": status}
        model = runtime.load(out)
        runners[f"lpcompile {fmt} (TVM)"] = lambda x, m=model: m.run({"x": x})[m.output_names[0]]
    ort_q = args.work / "ort_static_int8.onnx"
    if not ort_q.exists():
        ort_static_int8(float_path, ort_q, calib)
    times_file = args.work / "build_seconds.json"
    if times_file.exists():
        times = {**json.loads(times_file.read_text()), **times}
    times_file.write_text(json.dumps(times))
    if args.prepare:
        print(f"prepared {args.work}: {json.dumps(times)}")
        return 0
    runners["onnxruntime int8 (static QDQ)"] = lambda x, s=ort_session(ort_q): s.run(None, {"x": x})[0]
    try:
        ov_fp32, ov_int8 = openvino_models(float_path, calib)
        runners["openvino fp32"], runners["openvino int8 (NNCF)"] = ov_fp32, ov_int8
    except Exception as e:  # noqa: BLE001 (an optional peer: say why it is missing)
        notes["openvino"] = f"not run: {type(e).__name__}: {e}"

    float_out = [runners["onnxruntime fp32"](x) for x in held]
    cosine = {}
    for name, run in runners.items():
        outs = [run(x) for x in held]
        cos = [float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(outs, float_out)]
        cosine[name] = float(np.mean(cos))
    samples: dict[str, list[float]] = {name: [] for name in runners}
    x = held[0]
    for _ in range(args.rounds):
        for name, run in runners.items():
            run(x)
            for _ in range(args.reps):
                t = time.perf_counter()
                run(x)
                samples[name].append((time.perf_counter() - t) * 1e3)
            time.sleep(PAUSE_S)
    ms = {name: float(np.median(v)) for name, v in samples.items()}
    base = ms["onnxruntime fp32"]
    result = {
        "benchmark": "bench_cnn", "model": f"ResNet-18-shaped transformers ResNet, random weights, 1x3x{args.image}x{args.image}",
        "cpu": cpu(), "threads": THREADS, "reps": args.reps, "rounds": args.rounds,
        "latency_ms": ms, "speedup_vs_ort_fp32": {k: base / v for k, v in ms.items()},
        "cosine_vs_float": cosine, "weights": weights, "build_seconds": times, "notes": notes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name in runners:
        print(f"{name:32s} {ms[name]:8.2f} ms  x{base / ms[name]:.2f}  cos {cosine[name]:.5f}")
    print(json.dumps(weights))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
