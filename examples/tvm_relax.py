"""lpcompile's lowering in a TVM user's own flow: a QDQ model lpcompile wrote (W8A8: int8 weights,
static uint8 activations) imported by TVM's own ONNX frontend, built by tvm.compile with
lpcompile's Relax passes, run in the Relax VM and checked against onnxruntime on the same file.
Needs lpcompile[tvm]. Usage: python examples/tvm_relax.py [WORK_DIR]"""

from __future__ import annotations

import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import tvm
from tiny_model import calibration, mlp_model
from tvm import relax
from tvm.relax.frontend import onnx as relax_onnx

import lpcompile
import lpcompile.integrations.tvm as lpt


def main(work: str) -> None:
    lpcompile.compile(mlp_model(), format="int8", calibration=[calibration()]).save(work)
    path = f"{work}/model.qdq.onnx"

    target = lpt.host_target()  # this CPU, its features detected (Target({"kind": "llvm", "mcpu": ...}))
    mod = relax_onnx.from_onnx(onnx.load(path), shape_dict={"x": [16, 64]})  # TVM's own importer
    ex = tvm.compile(mod, target, relax_pipeline=lpt.passes(target))  # lower_qdq + lpcompile's CPU pipeline
    print("lowered:", dict(lpt.last_report().fired))

    x = np.random.default_rng(5).standard_normal((16, 64)).astype(np.float32)
    y = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the reference
    ref = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    diff = float(np.abs(y - ref).max() / np.abs(ref).max())
    print(f"TVM (lpcompile passes) vs onnxruntime: max diff {diff:.2e} of range")
    assert diff < 1e-2, diff  # uint8 activations: a code may move by one step (a different summation order)
    print("OK tvm_relax")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp() + "/mlp.lpc")
