"""W8A8 GEMM (M = 32 and 128 tokens, K = N = 4096), 2 threads, side by side in one run:

- lpcompile: a one-layer QDQ model (static uint8 asymmetric activations, per-channel int8 weights:
  the `int8` recipe's layer) lowered by lpcompile's TVM backend and run in the Relax VM, the
  activation quantizer included;
- onnxruntime int8: the same QDQ model, all graph optimizations on (it fuses the Q/DQ pattern
  into its integer MatMul kernels);
- onnxruntime fp32 and torch fp32: the float MatMul.

Each implementation rotates over `--copies` distinct weight sets (int8: 16 MiB each; 3 copies
exceed the 32 MiB last-level cache), in rounds that alternate implementations so load from other
users of the machine hits them alike. Figure: median milliseconds per GEMM; ratios against
lpcompile. Also checks lpcompile against onnxruntime on the QDQ model (graph optimizations off).

    python benchmarks/bench_w8a8_gemm.py        # writes benchmarks/results/w8a8_gemm.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

THREADS = 2
os.environ.setdefault("TVM_NUM_THREADS", str(THREADS))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

PAUSE_S = 0.2


def qdq_model(w: np.ndarray, w_scale: np.ndarray, x_scale: float, x_zp: int, float_weights: bool = False) -> onnx.ModelProto:
    """y[M, N] = DQ(Q(x)) @ DQ(w) (or x @ w_float)."""
    k, n = w.shape
    if float_weights:
        inits = [numpy_helper.from_array((w.astype(np.float32) * w_scale), "w")]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    else:
        inits = [numpy_helper.from_array(w, "wq"), numpy_helper.from_array(w_scale, "ws"),
                 numpy_helper.from_array(np.array(x_scale, np.float32), "xs"),
                 numpy_helper.from_array(np.array(x_zp, np.uint8), "xz")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], axis=1),
                 helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "w8a8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def ort_session(model: onnx.ModelProto, optimize: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--rows", type=int, nargs="+", default=[32, 128])
    p.add_argument("--copies", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3, help="sweeps per implementation per round")
    p.add_argument("-o", "--output", default="benchmarks/results/w8a8_gemm.json")
    args = p.parse_args()

    import torch
    import tvm
    from tvm import relax

    from lpcompile.backends.tvm.lower import compile_model
    from lpcompile.backends.tvm.target import host_target

    torch.set_num_threads(THREADS)
    k, n = args.k, args.n
    rng = np.random.default_rng(0)
    weights = [(rng.integers(-127, 128, (k, n)).astype(np.int8), rng.uniform(0.001, 0.002, n).astype(np.float32))
               for _ in range(args.copies)]
    x_scale, x_zp = 4.0 / 255, 128
    models = [qdq_model(w, s, x_scale, x_zp) for w, s in weights]
    target = host_target(THREADS)
    results = {"host": platform.processor() or platform.machine(), "target": str(target), "threads": THREADS,
               "k": k, "n": n, "copies": args.copies, "shapes": {}}
    vms = []
    for m in models:
        ex, report = compile_model(m, target)
        assert report.layers or report.fired, report
        vms.append(relax.VirtualMachine(ex, tvm.cpu()))
    kernels = sorted(k_ for k_ in report.fired)
    ort_int8 = [ort_session(m) for m in models]
    ort_fp32 = [ort_session(qdq_model(w, s, 0, 0, float_weights=True)) for w, s in weights]
    torch_w = [torch.from_numpy(w.astype(np.float32) * s) for w, s in weights]
    for rows in args.rows:
        x = rng.uniform(-2, 2, (rows, k)).astype(np.float32)
        xt, xtorch = tvm.runtime.tensor(x), torch.from_numpy(x)
        got = vms[0]["main"](xt).numpy()
        ref = ort_session(models[0], optimize=False).run(None, {"x": x})[0]
        max_diff = float(np.abs(got - ref).max())
        impls = {
            "lpcompile_tvm": lambda i: vms[i]["main"](xt),
            "ort_int8_qdq": lambda i: ort_int8[i].run(None, {"x": x}),
            "ort_fp32": lambda i: ort_fp32[i].run(None, {"x": x}),
            "torch_fp32": lambda i: xtorch @ torch_w[i],
        }
        times = {name: [] for name in impls}
        for _ in range(args.rounds):
            for name, f in impls.items():
                for i in range(args.copies):  # untimed sweep: warm up, let others' spinning threads sleep
                    f(i)
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    for i in range(args.copies):
                        f(i)
                    times[name].append((time.perf_counter() - t0) / args.copies)
                time.sleep(PAUSE_S)
        ms = {name: round(float(np.median(t)) * 1e3, 3) for name, t in times.items()}
        flops = 2 * rows * k * n
        results["shapes"][f"M{rows}"] = {
            "ms": ms,
            "gops": {name: round(flops / (v * 1e-3) / 1e9, 1) for name, v in ms.items()},
            "speedup_of_lpcompile_over": {name: round(v / ms["lpcompile_tvm"], 2) for name, v in ms.items() if name != "lpcompile_tvm"},
            "max_abs_diff_vs_ort_qdq": max_diff,
        }
        print(f"M={rows}: {ms}  (lpcompile vs ORT QDQ max |diff| {max_diff:.2e})", flush=True)
    results["lpcompile_kernels"] = kernels
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
