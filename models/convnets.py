"""Small seeded ONNX conv nets covering every convolution form lpcompile quantizes, written with
`onnx.helper` (no exporter in between, so the graph is exactly what the tests name):

`conv2d_net()`: x [batch, 8, 12, 12] -> Conv 3x3 (8->32, pad 1) -> Relu -> Conv 3x3 grouped
(32->32, 2 groups, stride 2, pad 1) -> Relu -> Conv 3x3 depthwise (32 groups, pad 1) -> Relu ->
ConvTranspose 2x2 (32->16, stride 2) -> Relu -> Conv 1x1 (16->32) -> [batch, 32, 12, 12].

`conv1d_net()`: x [batch, 16, 24] -> Conv1d k=3 dilation 2 (16->32) -> Relu -> Conv1d k=1
(32->64, stride 2) -> [batch, 64, 10].

`wide_cnn()`: ResNet-like channel widths (x [batch, 3, 16, 16]; 3x3 convs 3->64, 64->128 stride
2, 128->256 stride 2, then a 1x1 256->512): the weight-byte ratios of a real CNN, where
weights of wide layers dominate.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21


def _conv(name, x, cin_g, cout, k, rng, op="Conv", **attrs):
    shape = (cin_g, cout, *k) if op == "ConvTranspose" else (cout, cin_g, *k)
    fan_in = cin_g * int(np.prod(k))
    w = (rng.standard_normal(shape) * (2.0 / fan_in) ** 0.5).astype(np.float32)
    b = (rng.standard_normal(cout) * 0.05).astype(np.float32)
    inits = [numpy_helper.from_array(w, f"{name}.weight"), numpy_helper.from_array(b, f"{name}.bias")]
    node = helper.make_node(op, [x, f"{name}.weight", f"{name}.bias"], [f"{name}_out"], name=name, **attrs)
    return node, inits, f"{name}_out"


def _model(layers, x_shape, y_shape, seed, relu_between=True) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits, cur = [], [], "x"
    for i, (name, cin_g, cout, k, op, attrs) in enumerate(layers):
        node, init, cur = _conv(name, cur, cin_g, cout, k, rng, op, **attrs)
        nodes.append(node)
        inits += init
        if relu_between and i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [cur], [f"{name}_relu"], name=f"{name}_relu"))
            cur = f"{name}_relu"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def conv2d_net(seed: int = 0) -> onnx.ModelProto:
    return _model([
        ("stem", 8, 32, (3, 3), "Conv", {"pads": [1, 1, 1, 1]}),
        ("grouped", 16, 32, (3, 3), "Conv", {"group": 2, "strides": [2, 2], "pads": [1, 1, 1, 1]}),
        ("depthwise", 1, 32, (3, 3), "Conv", {"group": 32, "pads": [1, 1, 1, 1]}),
        ("up", 32, 16, (2, 2), "ConvTranspose", {"strides": [2, 2]}),
        ("head", 16, 32, (1, 1), "Conv", {}),
    ], ["batch", 8, 12, 12], ["batch", 32, 12, 12], seed)


def conv1d_net(seed: int = 0) -> onnx.ModelProto:
    return _model([
        ("c1", 16, 32, (3,), "Conv", {"dilations": [2]}),
        ("c2", 32, 64, (1,), "Conv", {"strides": [2]}),
    ], ["batch", 16, 24], ["batch", 64, 10], seed)


def wide_cnn(seed: int = 0) -> onnx.ModelProto:
    return _model([
        ("c1", 3, 64, (3, 3), "Conv", {"pads": [1, 1, 1, 1]}),
        ("c2", 64, 128, (3, 3), "Conv", {"pads": [1, 1, 1, 1], "strides": [2, 2]}),
        ("c3", 128, 256, (3, 3), "Conv", {"pads": [1, 1, 1, 1], "strides": [2, 2]}),
        ("c4", 256, 512, (1, 1), "Conv", {}),
    ], ["batch", 3, 16, 16], ["batch", 512, 4, 4], seed)


def calibration(model: onnx.ModelProto, n: int = 4, batch: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """`n` random batches for the model's input `x` (its dims with `batch` for the symbolic one)."""
    rng = np.random.default_rng(seed)
    dims = [d.dim_value or batch for d in model.graph.input[0].type.tensor_type.shape.dim]
    return [{"x": rng.standard_normal(dims).astype(np.float32)} for _ in range(n)]
