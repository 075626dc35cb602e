"""MLIR out: a W8A8 model written as MLIR through torch-mlir (the torch dialect, and
linalg-on-tensors), the linalg module lowered to LLVM and run by MLIR's ExecutionEngine, checked
against onnxruntime on the QDQ model. Needs lpcompile[mlir]. Usage: python examples/mlir.py [OUT_DIR]"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from tiny_model import calibration, mlp_model

import lpcompile
from lpcompile.backends.mlir import LinalgRunner


def main(out: str) -> None:
    art = lpcompile.compile(mlp_model(), format="int8", calibration=[calibration()], emit=("onnx", "mlir"))
    art.save(out)  # model.qdq.onnx, model.torch.mlir, model.linalg.mlir, report.json
    print("mlir:", json.loads((Path(out) / "report.json").read_text())["mlir"])
    linalg = (Path(out) / "model.linalg.mlir").read_text()
    print("linalg ops:", sorted({w.split("(")[0] for w in linalg.split() if w.startswith("linalg.")}))

    x = np.random.default_rng(11).standard_normal((8, 64)).astype(np.float32)
    (y,) = LinalgRunner(onnx.load(Path(out) / "model.qdq.onnx"))(x)  # linalg -> LLVM -> ExecutionEngine
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(str(Path(out) / "model.qdq.onnx"), options).run(None, {"x": x})[0]
    diff = float(np.abs(y - ref).max() / np.abs(ref).max())
    print(f"MLIR ExecutionEngine vs onnxruntime: max diff {diff:.2e} of range")
    assert diff < 1e-5, diff
    print("OK mlir")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp() + "/mlp.lpc")
