"""Convolutions as linear layers: found with the right canonical [K, N] geometry, the canonical
layout round-trips to the stored one, weight specs are fitted to what one ONNX DequantizeLinear
expresses on a conv weight, and the pattern does not fire where it must not."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from lpcompile.formats import PerBlock, PerChannel, QuantSpec
from lpcompile.ir.patterns import conv_weight_spec, find_linear_layers, why_not_linear
from models.convnets import conv1d_net, conv2d_net


def _layers(proto):
    return {l.name: l for l in find_linear_layers(ir.serde.deserialize_model(proto).graph)}


def test_every_conv_form_is_a_layer_with_canonical_shape():
    layers = _layers(conv2d_net())
    assert {n: (l.kind, l.in_features, l.out_features) for n, l in layers.items()} == {
        "stem": ("conv", 9 * 8, 32), "grouped": ("conv", 9 * 16, 32), "depthwise": ("conv", 9, 32),
        "up": ("conv", 4 * 32, 16), "head": ("conv", 16, 32)}
    assert layers["up"].storage_axis(1) == 1 and layers["up"].storage_axis(0) == 0  # ConvTranspose [Cin, Cout, kh, kw]
    assert layers["stem"].storage_axis(1) == 0 and layers["stem"].storage_axis(0) == 1
    one_d = _layers(conv1d_net())
    assert (one_d["c1"].in_features, one_d["c1"].out_features) == (3 * 16, 32)
    assert find_linear_layers(ir.serde.deserialize_model(conv2d_net()).graph, convs=False) == []


@pytest.mark.parametrize("name", ["stem", "grouped", "up", "head"])
def test_canonical_layout_round_trips_and_matches_im2col(name):
    layer = _layers(conv2d_net())[name]
    stored = layer.weight.const_value.numpy()
    canonical = layer.canonical(stored)
    assert canonical.shape == (layer.in_features, layer.out_features)
    np.testing.assert_array_equal(layer.to_storage(canonical), stored)
    if name != "up":  # K is tap-major, channel-minor: row (tap t, channel c) is W[:, c, *t]
        k = stored.shape[2:]
        t = (1 % k[0], 0)
        c = stored.shape[1] - 1
        row = (t[0] * k[1] + t[1]) * stored.shape[1] + c
        np.testing.assert_array_equal(canonical[row], stored[:, c, t[0], t[1]])


def test_conv_weight_spec_fits_blocks_to_input_channels():
    layers = _layers(conv2d_net())
    block = QuantSpec.parse("int4:block(0,128):sym")
    spec, why = conv_weight_spec(layers["head"], block)  # 16 input channels: one block each tap
    assert spec.granularity == PerBlock(0, 16) and "blocks of 16" in why
    spec, why = conv_weight_spec(layers["stem"], block)  # 8 channels: per output channel
    assert spec.granularity == PerChannel(1) and "per output channel" in why
    spec, why = conv_weight_spec(layers["depthwise"], block)
    assert spec.granularity == PerChannel(1)
    same = QuantSpec.parse("int8:channel(1):sym")
    assert conv_weight_spec(layers["grouped"], same) == (same, "")
    assert conv_weight_spec(layers["grouped"], QuantSpec.parse("int4:block(0,16):sym"))[1] == ""


def test_does_not_fire_on_runtime_weights_or_grouped_transpose():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8, 8])
    w = onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [4, 4, 3, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    z = onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)
    wt = onnx.numpy_helper.from_array(np.ones((4, 2, 2, 2), np.float32), "wt")
    g = onnx.helper.make_graph([onnx.helper.make_node("Conv", ["x", "w"], ["y"]),
                                onnx.helper.make_node("ConvTranspose", ["x", "wt"], ["z"], group=2)],
                               "g", [x, w], [y, z], [wt])
    model = ir.serde.deserialize_model(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 21)]))
    assert find_linear_layers(model.graph) == []
    assert [why_not_linear(n) for n in model.graph] == [
        "Conv weight is not a constant", "grouped ConvTranspose (its weight's output-channel axis is per group)"]


@pytest.mark.parametrize("net", [conv2d_net, conv1d_net])
def test_patches_times_canonical_weight_is_the_conv(net):
    """`conv_patches(x) @ canonical(W) + b` equals onnxruntime's Conv (what GPTQ's XᵀX is over)."""
    from lpcompile.ir.patterns import conv_patches
    from tests.conftest import ort_run

    proto = net()
    layers = _layers(proto)
    first = next(iter(layers.values()))
    x = np.random.default_rng(3).standard_normal([2, *[d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]]]).astype(np.float32)
    proto.graph.output.append(onnx.ValueInfoProto(name=f"{first.name}_out"))
    conv_out = ort_run(proto, {"x": x})[1]
    rows = conv_patches(first, x)
    w = first.canonical(first.weight.const_value.numpy())
    y = rows @ w + first.bias.const_value.numpy()
    spatial = conv_out.shape[2:]
    expect = np.moveaxis(conv_out, 1, -1).reshape(-1, conv_out.shape[1])
    assert rows.shape[0] == 2 * int(np.prod(spatial))
    np.testing.assert_allclose(y, expect, rtol=1e-4, atol=1e-5)
    assert conv_patches(layers.get("grouped", first), x) is None or "grouped" not in layers
