"""MiniLM through the TVM artifact, side by side in one run with onnxruntime (2 threads): the
artifact's Relax VM (`lpcompile.runtime.load`) against onnxruntime on the float model and on the
same QDQ model, batch B x sequence L of held-out sentences (minilm.eval.npz), latency p50/p90/p99.

    python -m models.export minilm build/minilm.onnx
    lpcompile build/minilm.onnx --format int4 --calibration build/minilm.calib --emit onnx,tvm -o build/int4
    python benchmarks/bench_minilm_tvm.py build/int4 --float build/minilm.onnx --eval build/minilm.eval.npz
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def percentiles(times_s: list[float]) -> dict:
    ms = np.array(times_s) * 1e3
    return {f"p{p}_ms": round(float(np.percentile(ms, p)), 3) for p in (50, 90, 99)}


def ort_latency(path: str, feeds: dict, warmup: int, repeat: int) -> dict:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return percentiles(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("artifact")
    p.add_argument("--float", required=True, help="the float ONNX model")
    p.add_argument("--eval", required=True, help="held-out inputs (.npz)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeat", type=int, default=100)
    p.add_argument("-o", "--output", default="benchmarks/results/minilm_tvm.json")
    args = p.parse_args()

    from lpcompile import runtime

    model = runtime.load(args.artifact)
    with np.load(args.eval) as ev:
        feeds = {k: np.ascontiguousarray(ev[k][: args.batch, : args.seq]) for k in model.input_names}
    tvm = model.benchmark(feeds, warmup=args.warmup, repeat=args.repeat)
    result = {
        "artifact": args.artifact,
        "format": model.manifest.get("format"),
        "target": model.manifest.get("target"),
        "shapes": {k: list(v.shape) for k, v in feeds.items()},
        "tvm": {k: round(v, 3) for k, v in tvm.items() if k.endswith("_ms")},
        "ort_fp32": ort_latency(args.float, feeds, args.warmup, args.repeat),
        "ort_qdq": ort_latency(str(Path(args.artifact) / "model.qdq.onnx"), feeds, args.warmup, args.repeat),
    }
    print(json.dumps(result, indent=2))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
