"""lpcompile's CUDA GEMM kernels on a real GPU: correctness against numpy, speed against cuBLAS.

Two steps, because the GPU machine has TVM's runtime but not its compiler:

    python benchmarks/gpu_kernels.py build DIR [--arch sm_90]   # here: kernels.so + fatbins + cases
    python benchmarks/gpu_kernels.py run DIR [-o results.json]  # on the GPU: TVM runtime, numpy, torch

`build` compiles (nvcc, for --arch) the kernels the lowering emits for each 8-bit and 4-bit
pair: the tensor-core kernel (`mma`, in several tilings), the plain schedule of the same
definitions, and the int4 / W4A8 kernels; and writes test cases whose expected outputs numpy
computes from the unpacked codes (int64 sums for integers, float64 for fp8), not from our code.

`run` loads the library through lpcompile's runtime (the fatbins answer TVM's load-time compile
callback), checks every case, then times every kernel at K = N = 4096 for several row counts
against torch on the same GPU: `torch._int_mm` (cuBLAS int8), fp16 matmul, and `torch._scaled_mm`
(fp8) where the GPU has it. Times are CUDA-event medians; the table gives TFLOP/s and GB/s.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from gpu_common import target_for, two_step_parser  # a sibling script: benchmarks/ is on sys.path

K_CHECK, N_CHECK = 256, 128
ROWS_CHECK = (1, 5, 37, 70, 200)
K_BENCH = N_BENCH = 4096
ROWS_BENCH = (1, 16, 128, 256, 1024)
BLOCK = 128

# name: (activation, weight, dot4, block, kernel: a tensor-core tiling of TILINGS, or "plain")
KERNELS = {
    "u8s8": ("uint8", "int8", True, None, "adaptive"),
    "u8s8_small": ("uint8", "int8", True, None, "small"),
    "u8s8_large": ("uint8", "int8", True, None, "large"),
    "u8s8_plain": ("uint8", "int8", False, None, "plain"),
    "s8s8_b128": ("int8", "int8", True, BLOCK, "adaptive"),
    "e4m3": ("float8_e4m3fn", "float8_e4m3fn", True, None, "adaptive"),
    "e4m3_plain": ("float8_e4m3fn", "float8_e4m3fn", False, None, "plain"),
    "e5m2_b128": ("float8_e5m2", "float8_e5m2", True, BLOCK, "adaptive"),
    "f32_int4_b128": ("float32", "int4", False, BLOCK, "auto"),
    "f32_int4_b128_plain": ("float32", "int4", False, BLOCK, "plain"),
    "s8_int4_b128": ("int8", "int4", False, BLOCK, "plain"),
    "f32_e4m3_b128": ("float32", "float8_e4m3fn", False, BLOCK, "plain"),
}


# One row, weights streamed from HBM: K = N = COLD_DIM, rotated over copies that together exceed
# the L2 several times, so every call reads its weights from memory.
COLD_DIM = 8192
COLD_KERNELS = ("u8s8", "e4m3", "f32_int4_b128")
COLD_BYTES = 512 << 20  # all copies of one kernel's weights together


# --- build (compiler machine) ---------------------------------------------------------------------


def _definition(spec, k, n, rows=None):
    from lpcompile.backends.tvm.kernels import quantized_matmul

    act, wt, dot4, block, _ = spec
    return quantized_matmul(rows, k, n, weight=wt, activation=act, block_size=block, dot4=dot4)


def _scheduled(spec, func, target):
    from lpcompile.backends.tvm.kernels import cpu, cuda, mma

    kind = spec[4]
    if target.kind.name == "llvm":  # the cases checked on this CPU: generic schedules of the same definitions
        return cpu.schedule(func, target, generic_only=True)
    if kind == "auto":  # whatever the lowering's CUDA schedule table picks
        return cuda.schedule(func, target)
    if kind != "plain":  # the tensor-core kernel: as the lowering picks it, or one tiling only
        assert mma.applies(func, target), spec
        return mma.mma_gemm(func, {"adaptive": None, "small": mma.SMALL, "large": mma.LARGE}[kind])
    return cuda.SCHEDULES["quantized_matmul"](func)


def _case(spec, m, k, n, rng):
    """Inputs (in the definition's parameter order) and numpy's expected output."""
    import ml_dtypes

    from lpcompile.backends.tvm.kernels import DOT4, NIBBLE

    act, wt, dot4, block, _ = spec
    blk = block or k
    nb = k // blk
    if wt == "int4":
        q = rng.integers(-8, 8, (k, n)).astype(np.int8)
        w = NIBBLE.pack(q, k)
    elif wt == "int8":
        q = rng.integers(-128, 128, (k, n)).astype(np.int8)
        w = DOT4.pack(q, k) if dot4 else q
    else:
        q = rng.standard_normal((k, n)).astype(getattr(ml_dtypes, wt))
        w = DOT4.pack(q, k) if dot4 else q
    w_scale = rng.uniform(0.5, 2.0, (nb, n)).astype(np.float32) / 64
    qf = q.astype(np.float64)
    args = {}
    if act == "float32":
        x = rng.standard_normal((m, k)).astype(np.float32)
        xv = x.astype(np.float64)
        args.update(x=x)
    elif act in ("uint8", "int8") and wt == "int8":
        lo, hi = (0, 256) if act == "uint8" else (-128, 128)
        x = rng.integers(lo, hi, (m, k)).astype(act)
        zp = np.array([lo + 77], act)
        xs = np.array([0.03], np.float32)
        xv = (x.astype(np.float64) - float(zp[0])) * float(xs[0])
        colsum = q.astype(np.int64).reshape(nb, blk, n).sum(axis=1).astype(np.int32)
        args.update(x=x, x_scale=xs, x_zero_point=zp)
    elif act == "int8":  # per-token int8 x int4
        x = rng.integers(-128, 128, (m, k)).astype(np.int8)
        xs = rng.uniform(0.01, 0.05, m).astype(np.float32)
        xv = x.astype(np.float64) * xs[:, None]
        args.update(x=x, x_scale=xs)
    else:  # fp8 x fp8
        x = rng.standard_normal((m, k)).astype(getattr(ml_dtypes, act))
        xs = np.array([0.25], np.float32)
        xv = x.astype(np.float64) * float(xs[0])
        args.update(x=x, x_scale=xs)
    args.update(w=w, w_scale=w_scale)
    if "x_zero_point" in args:
        args["w_colsum"] = colsum
    expected = sum((xv[:, b * blk:(b + 1) * blk] @ qf[b * blk:(b + 1) * blk]) * w_scale[b] for b in range(nb))
    return args, expected.astype(np.float32)


def build(out: Path, arch: str) -> None:
    import tvm

    from lpcompile.backends.tvm.export import _cuda_binaries

    out.mkdir(parents=True, exist_ok=True)
    target = target_for(arch)
    funcs, meta, cases = {}, {"arch": arch, "kernels": {}, "cases": []}, {}
    rng = np.random.default_rng(0)
    for name, spec in KERNELS.items():
        shapes = [("check", (K_CHECK, N_CHECK)), ("bench", (K_BENCH, N_BENCH))]
        if name in COLD_KERNELS:
            shapes.append(("cold", (COLD_DIM, COLD_DIM)))
        for tag, (k, n) in shapes:
            fname = f"{name}_{tag}"
            func = _definition(spec, k, n)
            funcs[fname] = _scheduled(spec, func, target).with_attr("global_symbol", fname)
            meta["kernels"][fname] = {"spec": list(spec), "k": k, "n": n,
                                      "params": [[p.name, [int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in p.shape],
                                                  str(p.dtype)] for p in func.params]}
        for m in ROWS_CHECK:
            args, expected = _case(spec, m, K_CHECK, N_CHECK, rng)
            key = f"{name}_check/m{m}"
            for a, v in args.items():
                cases[f"{key}/{a}"] = v
            cases[f"{key}/expected"] = expected
            meta["cases"].append({"kernel": f"{name}_check", "m": m, "key": key,
                                  "dtypes": {a: str(v.dtype) for a, v in args.items()}})
    t0 = time.perf_counter()
    ex = tvm.compile(tvm.IRModule(funcs), target=target)
    meta["binaries"] = _cuda_binaries(ex, target, out) if target.kind.name == "cuda" else []
    ex.export_library(str(out / "kernels.so"))
    np.savez_compressed(out / "cases.npz", **{k: (v.view(np.uint8) if str(v.dtype).startswith("float8") else v) for k, v in cases.items()})
    (out / "kernels.json").write_text(json.dumps(meta, indent=1))
    print(f"built {len(funcs)} kernels for {arch} in {time.perf_counter() - t0:.1f} s -> {out}")


# --- run (GPU machine: TVM runtime only) ---------------------------------------------------------


def _tensor(tvm, arr: np.ndarray, dtype: str, dev):
    if dtype.startswith("float8"):
        import ml_dtypes

        arr = arr.view(getattr(ml_dtypes, dtype))
    return tvm.runtime.tensor(arr, dev)


def _random_args(tvm, params, m: int, dev, rng):
    """Inputs of the right shapes and dtypes (valid finite values) for timing only."""
    import ml_dtypes

    out = []
    for name, shape, dtype in params:
        shp = [m if d is None else d for d in shape]
        if dtype.startswith("float8"):
            a = (rng.standard_normal(shp) * 0.5).astype(getattr(ml_dtypes, dtype))
        elif dtype == "float32":
            a = rng.uniform(0.5, 1.5, shp).astype(np.float32) * (1 if name == "x" else 0.01)
        elif dtype == "uint32":
            a = rng.integers(0, 2**32, shp, dtype=np.uint64).astype(np.uint32)
        else:
            info = np.iinfo(dtype)
            a = rng.integers(info.min, info.max, shp, endpoint=True).astype(dtype)
        out.append(tvm.runtime.tensor(a, dev))
    return out


def _torch_baselines(m: int, k: int, n: int, reps: int) -> dict:
    import torch

    def timed(fn):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) * 1e3)
        return float(np.median(times))

    out = {}
    a16 = torch.randn(m, k, device="cuda", dtype=torch.float16)
    b16 = torch.randn(k, n, device="cuda", dtype=torch.float16)
    out["torch_fp16"] = timed(lambda: a16 @ b16)
    a32, b32 = a16.float(), b16.float()
    out["torch_fp32"] = timed(lambda: a32 @ b32)
    try:  # cuBLAS int8: M > 16, K and N multiples of 8
        a8 = torch.randint(-128, 127, (m, k), device="cuda", dtype=torch.int8)
        b8 = torch.randint(-128, 127, (n, k), device="cuda", dtype=torch.int8).t()
        out["torch_int_mm"] = timed(lambda: torch._int_mm(a8, b8))
    except Exception as e:  # noqa: BLE001 - a baseline the build cannot run is recorded, not fatal
        out["torch_int_mm"] = f"unavailable: {str(e).splitlines()[0][:120]}"
    try:
        af = a16.to(torch.float8_e4m3fn)
        bf = b16.t().contiguous().to(torch.float8_e4m3fn).t()
        one = torch.tensor(1.0, device="cuda")
        out["torch_scaled_mm_fp8"] = timed(lambda: torch._scaled_mm(af, bf, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    except Exception as e:  # noqa: BLE001
        out["torch_scaled_mm_fp8"] = f"unavailable: {str(e).splitlines()[0][:120]}"
    return out


def _cold(tvm, lib, meta, dev, rng) -> dict:
    """One row at K = N = COLD_DIM with the weights rotated over copies (COLD_BYTES together, many
    times the L2): microseconds per call (CUDA events around 64 back-to-back calls) and the
    weight bytes per second that makes, against torch fp16 (same rotation) and a device copy."""
    import torch

    def per_call_us(calls) -> float:
        for c in calls[:4]:
            c()
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for i in range(64):
                calls[i % len(calls)]()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) * 1e3 / 64)
        return float(np.median(times))

    out = {"k": COLD_DIM, "n": COLD_DIM, "rows": 1, "kernels": {}}
    for name in COLD_KERNELS:
        fname = f"{name}_cold"
        params = meta["kernels"][fname]["params"]
        one = _random_args(tvm, params, 1, dev, rng)
        w_index = [p[0] for p in params].index("w")
        w = one[w_index]
        w_bytes = int(np.prod(w.shape)) * (4 if str(w.dtype) in ("uint32", "int32", "float32") else 1)
        copies = max(2, COLD_BYTES // w_bytes)
        weights = [w] + [w.copyto(tvm.runtime.empty(w.shape, w.dtype, dev)) for _ in range(copies - 1)]
        f = lib[fname]
        calls = [(lambda w=w: f(*one[:w_index], w, *one[w_index + 1:])) for w in weights]
        us = per_call_us(calls)
        out["kernels"][f"lpc_{name}"] = {"us": us, "weight_bytes": w_bytes, "copies": copies,
                                         "weight_GB_per_s": w_bytes / (us * 1e-6) / 1e9}
    a = torch.randn(1, COLD_DIM, device="cuda", dtype=torch.float16)
    w16 = [torch.randn(COLD_DIM, COLD_DIM, device="cuda", dtype=torch.float16) for _ in range(max(2, COLD_BYTES // (2 * COLD_DIM ** 2)))]
    us = per_call_us([(lambda w=w: a @ w) for w in w16])
    out["kernels"]["torch_fp16"] = {"us": us, "weight_bytes": 2 * COLD_DIM ** 2, "copies": len(w16),
                                    "weight_GB_per_s": 2 * COLD_DIM ** 2 / (us * 1e-6) / 1e9}
    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_us = per_call_us([lambda: dst.copy_(src)])
    out["device_copy_GB_per_s"] = 2 * src.numel() / (copy_us * 1e-6) / 1e9  # read + write
    del w16, src, dst
    print("cold, 1 row, K = N = %d: " % COLD_DIM + "  ".join(
        f"{k}={v['us']:.1f} us ({v['weight_GB_per_s']:.0f} GB/s)" for k, v in out["kernels"].items())
        + f"  device copy {out['device_copy_GB_per_s']:.0f} GB/s")
    return out


def run(out: Path, result_path: Path, reps: int) -> int:
    import tvm

    from lpcompile.runtime.tvm import _ensure_cuda_runtime, _serve_cuda_binaries

    meta = json.loads((out / "kernels.json").read_text())
    if meta["arch"] != "llvm":
        _ensure_cuda_runtime()
    dev = tvm.cpu(0) if meta["arch"] == "llvm" else tvm.cuda(0)
    if not dev.exist:
        print("no CUDA device", file=sys.stderr)
        return 2
    _serve_cuda_binaries(out, meta["binaries"])
    lib = tvm.runtime.load_module(str(out / "kernels.so"))
    cases = np.load(out / "cases.npz")
    failures, checks, failed = 0, [], {}
    for c in meta["cases"]:
        kmeta = meta["kernels"][c["kernel"]]
        arrays = [_tensor(tvm, cases[f"{c['key']}/{p}"], c["dtypes"].get(p, dt), dev) for p, _, dt in kmeta["params"] if p != "y"]
        y = tvm.runtime.tensor(np.zeros((c["m"], kmeta["n"]), np.float32), dev)
        lib[c["kernel"]](*arrays, y)
        got, want = y.numpy(), cases[f"{c['key']}/expected"]
        err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
        # fp8 x fp8: the tensor cores add the exact products in their own order and (Hopper) with
        # a narrower accumulator than fp32; the kernel hands each K block's sum to fp32 registers
        tol = 4e-3 if kmeta["spec"][0].startswith("float8") else 1e-5
        ok = err <= tol
        failures += not ok
        checks.append({"kernel": c["kernel"], "m": c["m"], "max_rel_err": err, "ok": ok})
        if not ok:  # keep what came out, and where it is wrong within the 16 x 8 mma tiles
            failed[c["key"]] = got
            bad = ~np.isclose(got, want, rtol=tol * 10, atol=tol * np.abs(want).max())
            rows, cols = np.nonzero(bad)
            checks[-1]["bad_fraction"] = float(bad.mean())
            checks[-1]["bad_row_mod16"] = np.bincount(rows % 16, minlength=16).tolist()
            checks[-1]["bad_col_mod8"] = np.bincount(cols % 8, minlength=8).tolist()
        print(f"{'ok  ' if ok else 'FAIL'} {c['kernel']:<24} m={c['m']:<4} max|err|/max|y| = {err:.2e}")
    rng = np.random.default_rng(1)
    bench = []
    for m in ROWS_BENCH if meta["arch"] != "llvm" else ():  # (no timing on the CPU check)
        row = {"m": m, "k": K_BENCH, "n": N_BENCH, "us": {}}
        for name in KERNELS:
            fname = f"{name}_bench"
            args = _random_args(tvm, meta["kernels"][fname]["params"], m, dev, rng)
            f = lib.time_evaluator(fname, dev, number=5, repeat=reps)
            row["us"][f"lpc_{name}"] = float(np.median(f(*args).results) * 1e6)
        for b, v in _torch_baselines(m, K_BENCH, N_BENCH, reps).items():
            row["us"][b] = v
        flops = 2.0 * m * K_BENCH * N_BENCH
        row["tflops"] = {k: flops / (v * 1e-6) / 1e12 for k, v in row["us"].items() if isinstance(v, float)}
        bench.append(row)
        print(f"m={m:<5} " + "  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}=n/a" for k, v in row["us"].items()))
    import torch

    cold = _cold(tvm, lib, meta, dev, rng) if meta["arch"] != "llvm" else None
    result = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "arch": meta["arch"], "checks": checks, "failures": failures,
              "bench_us_median": bench, "reps": reps, "unit": "microseconds per GEMM (CUDA-event or time_evaluator median)",
              "cold_one_row": cold}
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1))
    if failed:
        np.savez_compressed(result_path.with_suffix(".failed.npz"), **failed)
    print(f"{len(checks) - failures}/{len(checks)} cases correct; results -> {result_path}")
    return 1 if failures else 0


def main(argv=None) -> int:
    p, _, r = two_step_parser(__doc__, "benchmarks/results/gpu_kernels.json")
    r.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    if args.cmd == "build":
        build(Path(args.dir), args.arch)
        return 0
    return run(Path(args.dir), Path(args.output), args.reps)


if __name__ == "__main__":
    sys.exit(main())
