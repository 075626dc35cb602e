"""The kernel rules' choice on this CPU against the generic schedule of the same compute definition,
on MiniLM's layer shapes (K x N = 384 x 1536, 1536 x 384, 384 x 384) at 1, 32 and 128 rows:
uint8 x int8 (W8A8, the `int8` recipe) and int8 x int4 block 128 (W4A8). "before" is what this
CPU got before its hand kernel existed: the generic schedule on the plain layout (row-major int8,
NIBBLE int4 tiles); "rule" is the kernel `rules.schedule_matmul` picks now (named in the JSON).
Same inputs, TVM's time_evaluator, the two interleaved per shape, `--threads` threads.

    python benchmarks/bench_avx2_kernels.py      # writes benchmarks/results/avx2_kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

SHAPES = [(m, k, n) for m in (1, 32, 128) for k, n in ((384, 1536), (1536, 384), (384, 384))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("-o", "--output", default="benchmarks/results/avx2_kernels.json")
    args = p.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import tvm

    from lpcompile.backends.tvm.kernels import DOT4, NIB8, NIBBLE, cpu, quantized_matmul
    from lpcompile.backends.tvm.kernels.rules import MatmulSpec, choose, schedule_matmul
    from lpcompile.backends.tvm.target import describe, host_target
    from bench_whole_models import cpu_info

    target, dev = host_target(), tvm.cpu()
    results = {"cpu": cpu_info(), "threads": args.threads, "cases": []}
    rng = np.random.default_rng(0)
    for pair in ("w8a8", "w4a8"):
        for m, k, n in SHAPES:
            if pair == "w8a8":
                x = rng.integers(0, 256, (m, k)).astype(np.uint8)
                q = rng.integers(-127, 128, (k, n)).astype(np.int8)
                head = [x, np.array([0.02], np.float32), np.array([128], np.uint8)]
                tail = [rng.uniform(0.01, 0.02, (1, n)).astype(np.float32),
                        q.astype(np.int64).sum(0, keepdims=True).astype(np.int32)]
                layouts = {True: DOT4.pack(q, k), False: q}
                make = lambda dot4: quantized_matmul(m, k, n, weight="int8", activation="uint8", dot4=dot4)  # noqa: E731
            else:
                x = rng.integers(-128, 128, (m, k)).astype(np.int8)
                q = rng.integers(-8, 8, (k, n)).astype(np.int8)
                head = [x, rng.uniform(0.01, 0.02, m).astype(np.float32)]
                tail = [rng.uniform(0.01, 0.02, (k // 128, n)).astype(np.float32)]
                layouts = {True: NIB8.pack(q, k), False: NIBBLE.pack(q, k)}
                make = lambda dot4: quantized_matmul(m, k, n, weight="int4", activation="int8", block_size=128,  # noqa: E731
                                                     dot4=dot4)
            rule = choose(describe(target), MatmulSpec.of(make(True)))
            funcs = {"rule": (schedule_matmul(make(rule.dot4), target), layouts[rule.dot4]),
                     "before": (cpu.schedule(make(False), target, generic_only=True), layouts[False])}
            timers, outs = {}, {}
            for name, (func, w) in funcs.items():
                lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
                arrays = [tvm.runtime.tensor(a) for a in (*head, w, *tail, np.zeros((m, n), np.float32))]
                lib["main"](*arrays)
                outs[name] = arrays[-1].numpy()
                timers[name] = (lib.mod.time_evaluator("main", dev, number=5, repeat=1), arrays)
            np.testing.assert_allclose(outs["rule"], outs["before"], rtol=1e-5, atol=1e-5 * np.abs(outs["before"]).max())
            times = {name: [] for name in timers}
            for _ in range(args.rounds):
                for name, (f, arrays) in timers.items():
                    times[name].append(f(*arrays).mean)
            us = {name: round(float(np.median(t)) * 1e6, 1) for name, t in times.items()}
            case = {"pair": pair, "m": m, "k": k, "n": n, "rule": rule.rule.name, "us": us,
                    "speedup": round(us["before"] / us["rule"], 2)}
            results["cases"].append(case)
            print(case, flush=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
