"""A tool built on onnx-graphsurgeon hands its graph to lpcompile and gets a graph back: the
graph (here edited first: the model's output renamed) goes into `lpcompile.compile` as it is,
the QDQ result comes back as an onnx-graphsurgeon graph (`lpcompile.ir.to_graphsurgeon`) for the
tool to inspect or edit further, and runs in onnxruntime.
Needs `pip install onnx-graphsurgeon` (lpcompile[graphsurgeon]). Usage: python examples/graphsurgeon.py"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort
from tiny_model import calibration, mlp_model

import lpcompile
from lpcompile.ir import to_graphsurgeon


def main() -> None:
    graph = gs.import_onnx(mlp_model())
    graph.outputs[0].name = "embedding"  # the tool's own edit before quantization
    art = lpcompile.compile(graph, target="llvm", format="w8a16", calibration=[calibration()])

    qdq = to_graphsurgeon(art.qdq_model)  # back in the tool's world
    dq = [n for n in qdq.nodes if n.op == "DequantizeLinear"]
    for node in dq:  # int8 weights, per output channel (int4 constants: do not read .values, see ENVIRONMENT)
        print(f"{node.name}: {node.inputs[0].name} {node.inputs[0].dtype} {node.inputs[0].shape} axis={node.attrs.get('axis')}")
    model = gs.export_onnx(qdq)
    x = np.random.default_rng(3).standard_normal((16, 64)).astype(np.float32)
    options = ort.SessionOptions()  # default optimizations; MatMulNBits at full precision (see README)
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    y = session.run(["embedding"], {"x": x})[0]
    (ref,) = art.run({"x": x}).values()  # the same QDQ model through lpcompile's reference runner
    diff = float(np.abs(y - ref).max() / np.abs(ref).max())
    print(f"{len(dq)} DequantizeLinear; onnxruntime (optimized) on the graphsurgeon export vs reference: {diff:.2e} of range")
    assert len(dq) == 2 and diff < 1e-5, diff
    print("OK graphsurgeon")


if __name__ == "__main__":
    main()
