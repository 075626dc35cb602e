"""Localize a mismatch between a CUDA artifact and onnxruntime: every intermediate float tensor.

    python benchmarks/gpu_probe.py build DIR ART... [--arch sm_90]  # here: probe artifacts + references
    python benchmarks/gpu_probe.py run DIR                           # on the GPU (TVM runtime only)

For each compiled artifact ART (a directory with model.qdq.onnx, from `--emit onnx,tvm`), `build`
makes the QDQ model's intermediate float tensors graph outputs (in topological order, up to
--max-outputs; quantize/dequantize nodes' own outputs are left out so the lowering still fuses
them), compiles that for CUDA, and stores onnxruntime's values of every output for one batch of
the artifact's held-out inputs. `run` prints, per probe, each output's relative error and the
first tensors that disagree, with the op that produced them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from gpu_common import target_for, two_step_parser  # a sibling script: benchmarks/ is on sys.path

SKIP_OPS = {"QuantizeLinear", "DequantizeLinear", "Constant", "Shape", "ConstantOfShape", "Range", "Identity"}


def build(out: Path, artifacts: list[Path], arch: str, max_outputs: int, inputs: list[Path]) -> None:
    import onnx
    import onnxruntime as ort

    from lpcompile.backends.tvm.export import export_artifact

    out.mkdir(parents=True, exist_ok=True)
    meta = {"arch": arch, "probes": []}
    for art, feeds_path in zip(artifacts, inputs):
        model = onnx.load(str(art / "model.qdq.onnx"))
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
        candidates, ops = [], {}
        for node in model.graph.node:
            if node.op_type in SKIP_OPS:
                continue
            for o in node.output:
                if o and types.get(o) == onnx.TensorProto.FLOAT:
                    candidates.append(o)
                    ops[o] = f"{node.op_type} {node.name}"
        # evenly spread over the whole graph (every tensor when they fit), always the last ones
        if len(candidates) > max_outputs:
            tail = candidates[-max_outputs // 4:]
            head = candidates[: len(candidates) - len(tail)]
            step = len(head) / (max_outputs - len(tail))
            candidates = [head[int(i * step)] for i in range(max_outputs - len(tail))] + tail
        picked = candidates
        have = {o.name for o in model.graph.output}
        for o in picked:
            if o not in have:
                model.graph.output.append(onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None))
        names = [o.name for o in model.graph.output]
        name = art.name if art.name not in [p["name"] for p in meta["probes"]] else f"{art.parent.name}-{art.name}"
        d = out / name
        d.mkdir(exist_ok=True)
        with np.load(feeds_path) as f:
            feeds = {k: f[k] for k in f.files}
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        refs = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)
        manifest = export_artifact(model, target_for(arch), d)
        np.savez_compressed(d / "refs.npz", **{f"out{i}": r for i, r in enumerate(refs)}, **{f"in/{k}": v for k, v in feeds.items()})
        meta["probes"].append({"name": name, "outputs": names, "ops": [ops.get(n, "graph output") for n in names],
                               "artifact": str(art), "params_bytes": manifest["params_bytes"]})
        print(f"{name}: {len(names)} outputs", flush=True)
    (out / "probes.json").write_text(json.dumps(meta, indent=1))


def run(out: Path, shown: int) -> int:
    from lpcompile import runtime

    meta = json.loads((out / "probes.json").read_text())
    bad_total = 0
    for p in meta["probes"]:
        d = out / p["name"]
        m = runtime.load(d)
        r = np.load(d / "refs.npz")
        feeds = {k[3:]: r[k] for k in r.files if k.startswith("in/")}
        got = m.run(feeds)
        bad = []
        for i, (name, op) in enumerate(zip(p["outputs"], p["ops"])):
            want, have = r[f"out{i}"], got[name]
            if have.shape != want.shape:
                bad.append((i, name, op, f"shape {have.shape} != {want.shape}"))
                continue
            same = (have == want) | (np.isnan(have) & np.isnan(want))  # masks hold -inf on both sides
            diff = np.where(same, 0.0, have.astype(np.float64) - want)
            finite = np.isfinite(want)
            err = float(np.linalg.norm(np.nan_to_num(diff, nan=1e30, posinf=1e30, neginf=1e30))
                        / max(np.linalg.norm(want[finite]), 1e-30))
            if err > 1e-3:
                nonfinite = int((~np.isfinite(have) & ~same).sum())
                bad.append((i, name, op, f"rel err {err:.3e}, {nonfinite} non-finite, shape {list(want.shape)}"))
        print(f"== {p['name']}: {len(bad)} of {len(p['outputs'])} outputs differ", flush=True)
        for i, name, op, why in bad[:shown]:
            print(f"   #{i:<4} {op:<50} {name[:60]:<60} {why}")
        bad_total += len(bad)
    return 1 if bad_total else 0


def main(argv=None) -> int:
    p, b, r = two_step_parser(__doc__)
    b.add_argument("artifacts", nargs="+", help="ART:INPUTS.npz pairs")
    b.add_argument("--max-outputs", type=int, default=160)
    r.add_argument("--shown", type=int, default=12)
    args = p.parse_args(argv)
    if args.cmd == "build":
        pairs = [a.split(":") for a in args.artifacts]
        build(Path(args.dir), [Path(a) for a, _ in pairs], args.arch, args.max_outputs, [Path(i) for _, i in pairs])
        return 0
    return run(Path(args.dir), args.shown)


if __name__ == "__main__":
    sys.exit(main())
