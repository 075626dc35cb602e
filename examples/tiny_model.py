"""A small float ONNX model and calibration data for the examples (no download).

    python examples/tiny_model.py OUT_DIR     # OUT_DIR/mlp.onnx, OUT_DIR/calib.npz

mlp.onnx: x [batch, 64] -> LayerNorm -> Linear 64x256 -> GELU -> Linear 256x64 (+ residual),
the shape of a transformer's MLP; calib.npz: 32 samples of x (first axis = samples)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

D, HIDDEN = 64, 256


def mlp_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)

    def init(name, *shape, scale=0.1):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [init("ln.w", D, scale=0.02), init("ln.b", D, scale=0.02), init("fc1.w", D, HIDDEN), init("fc1.b", HIDDEN),
             init("fc2.w", HIDDEN, D), init("fc2.b", D)]
    inits[0] = numpy_helper.from_array(1 + numpy_helper.to_array(inits[0]), "ln.w")
    nodes = [
        helper.make_node("LayerNormalization", ["x", "ln.w", "ln.b"], ["n"], name="ln", axis=-1),
        helper.make_node("MatMul", ["n", "fc1.w"], ["h0"], name="fc1"), helper.make_node("Add", ["h0", "fc1.b"], ["h1"]),
        helper.make_node("Gelu", ["h1"], ["g"], name="gelu"),
        helper.make_node("MatMul", ["g", "fc2.w"], ["o0"], name="fc2"), helper.make_node("Add", ["o0", "fc2.b"], ["o1"]),
        helper.make_node("Add", ["x", "o1"], ["y"], name="residual"),
    ]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def calibration(samples: int = 32, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((samples, D)).astype(np.float32)}


def write(out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, calib = out / "mlp.onnx", out / "calib.npz"
    onnx.save(mlp_model(), model)
    np.savez(calib, **calibration())
    return model, calib


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/tiny_model.py OUT_DIR")
    for path in write(sys.argv[1]):
        print(path)
