"""What lpcompile's Relax passes (lpcompile.integrations.tvm) give a TVM user, side by side in one
run, on one linear layer (K = N = 1024, warm cache) written by lpcompile's quantizer as QDQ ONNX
(`w8a16`: per-channel int8 weights; `int8`: plus static uint8 activations):

- tvm_stock: TVM's own ONNX importer and `tvm.compile` with its default pipeline (dequantize in
  float, the matmul as TVM legalizes it: unscheduled on CPUs);
- relax_passes: the same import, `tvm.compile(relax_pipeline=lpcompile.integrations.tvm.passes(t))`
  (lpcompile's kernels as PrimFuncs of the module);
- lpcompile_artifact: lpcompile's own TVM backend (the same kernels compiled as a separate module);
- ort_default: onnxruntime on the QDQ file, default session (its own int8 kernels).

Rounds alternate the implementations so that load from other users of the machine hits them
alike; figure: median milliseconds per call; ratios against relax_passes. Every implementation
is checked against onnxruntime without optimizations first.

    flock /tmp/lpcompile-bench.lock python benchmarks/bench_relax_passes.py   # -> benchmarks/results/relax_passes.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

THREADS = 2
os.environ.setdefault("TVM_NUM_THREADS", str(THREADS))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
PAUSE_S = 0.1


def cpu() -> dict:
    text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = set(info.get("Flags", "").split())
    return {"model": info.get("Model name", platform.processor()).strip(), "flags": [f for f in FLAGS if f in flags]}


def linear(k: int, n: int, rows: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def ort_session(path: str, optimize: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("-o", "--output", default="benchmarks/results/relax_passes.json")
    args = p.parse_args()

    import tempfile

    import tvm
    from tvm import relax
    from tvm.relax.frontend import onnx as relax_onnx

    import lpcompile
    import lpcompile.integrations.tvm as lpt

    target = lpt.host_target(THREADS)
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((args.rows, args.k)).astype(np.float32)} for _ in range(4)]
    x = rng.standard_normal((args.rows, args.k)).astype(np.float32)
    results = {"cpu": cpu(), "target": str(target), "threads": THREADS, "k": args.k, "n": args.n, "rows": args.rows,
               "cache": "warm (one weight copy)", "recipes": {}}
    work = Path(tempfile.mkdtemp(prefix="bench-relax-"))
    for fmt in ("w8a16", "int8"):
        out = work / fmt
        lpcompile.compile(linear(args.k, args.n, args.rows), format=fmt, calibration=calib, rotate="off",
                          emit=("onnx", "tvm")).save(out)
        path = str(out / "model.qdq.onnx")
        stock = relax.VirtualMachine(tvm.compile(relax_onnx.from_onnx(onnx.load(path)), target), tvm.cpu())
        passes = relax.VirtualMachine(tvm.compile(relax_onnx.from_onnx(onnx.load(path)), target,
                                                  relax_pipeline=lpt.passes(target)), tvm.cpu())
        fired = dict(lpt.last_report().fired)
        artifact = lpcompile.runtime.load(out)
        ort_default = ort_session(path, optimize=True)
        xt = tvm.runtime.tensor(x)
        impls = {
            "tvm_stock": lambda: stock["main"](xt),
            "relax_passes": lambda: passes["main"](xt),
            "lpcompile_artifact": lambda: artifact(x),
            "ort_default": lambda: ort_default.run(None, {"x": x}),
        }
        ref = ort_session(path, optimize=False).run(None, {"x": x})[0]
        outputs = {"tvm_stock": stock["main"](xt).numpy(), "relax_passes": passes["main"](xt).numpy(),
                   "lpcompile_artifact": artifact(x), "ort_default": ort_default.run(None, {"x": x})[0]}
        diff = {k: float(np.abs(v - ref).max() / np.abs(ref).max()) for k, v in outputs.items()}
        times = {name: [] for name in impls}
        for _ in range(args.rounds):
            for name, f in impls.items():
                f()
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    f()
                    times[name].append(time.perf_counter() - t0)
                time.sleep(PAUSE_S)
        ms = {name: round(float(np.median(t)) * 1e3, 4) for name, t in times.items()}
        results["recipes"][fmt] = {
            "ms": ms, "ratio_to_relax_passes": {k: round(v / ms["relax_passes"], 2) for k, v in ms.items()},
            "max_diff_vs_ort_no_opt_of_range": diff, "lowered": fired,
        }
        print(f"{fmt}: {ms}; diff vs reference {diff}", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
