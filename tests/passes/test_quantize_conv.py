"""Quantized convolutions in onnxruntime: every recipe on 1-D, 2-D, grouped, depthwise and
transposed convs gives a QDQ model that onnxruntime runs (reference session and its default,
fusing one) within stated floors of the float model; weights are DequantizeLinear of low-bit
codes on the stored conv layout; recipes whose per-token input scales do not apply to a conv
keep its input float and say why; and over a CNN with ResNet-like widths the weight bytes are
about 1/4 (int8) and 1/8 (int4) of fp32."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import lpcompile
from lpcompile.backends.onnx import portable
from lpcompile.calibration_data import as_calibration_data
from lpcompile.passes import Calibrate, Quantize, UniformPlan
from lpcompile.recipes import RECIPES
from models.convnets import calibration, conv1d_net, conv2d_net, wide_cnn
from tests.conftest import ort_run, sqnr_db

# Measured on these seeded nets (random data), a few dB below: a drop is a regression.
FLOOR_DB = {"int4": 12.0, "w8a16": 35.0, "int8": 27.0, "w4a8": 12.0, "w4a4": 12.0, "fp8": 20.0, "fp8-e5m2": 14.0}


def _default_session_run(model: ir.Model, feeds):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), so).run(None, feeds)


@pytest.mark.parametrize("net", [conv2d_net, conv1d_net])
@pytest.mark.parametrize("fmt", sorted(RECIPES))
def test_every_recipe_on_every_conv_form_runs_in_onnxruntime(net, fmt):
    proto = net()
    feeds = calibration(proto, 1, seed=7)[0]
    ref = ort_run(proto, feeds)[0]
    art = lpcompile.compile(proto, format=fmt, calibration=calibration(proto))
    got = ort_run(art.qdq_model, feeds)[0]
    assert sqnr_db(ref, got) >= FLOOR_DB[fmt], sqnr_db(ref, got)
    default = _default_session_run(portable(art.qdq_model)[0], feeds)[0]  # the saved form, ORT fusing QLinearConv
    # onnxruntime's default session fuses DQ -> Conv -> Relu -> Q into QLinearConv, requantizing
    # each conv's output straight to the next input's codes (int8 on conv2d_net: 24 dB against 30)
    assert sqnr_db(ref, default) >= FLOOR_DB[fmt] - 5.0
    convs = [n for n in art.qdq_model.graph if n.op_type in ("Conv", "ConvTranspose")]
    assert len(convs) == len(proto.graph.node) - sum(n.op_type == "Relu" for n in proto.graph.node)
    recipe = RECIPES[fmt]
    for node in convs:
        w = node.inputs[1].producer()
        assert w is not None and w.op_type == "DequantizeLinear", node.name
        codes = w.inputs[0].const_value
        assert codes.dtype == recipe.weights.format.onnx_type
        assert tuple(codes.shape) == tuple(onnx.numpy_helper.to_array(
            next(i for i in proto.graph.initializer if i.name == f"{node.name}.weight")).shape)
        x = node.inputs[0].producer()
        quantized_input = x is not None and x.op_type in ("DequantizeLinear",) or (
            x is not None and x.op_type.startswith("PerTokenQDQ"))
        assert quantized_input == (recipe.activations is not None and not recipe.activations.dynamic), node.name
    if recipe.activations is not None and recipe.activations.dynamic:
        reasons = [c.reason for c in art.plan.layers]
        assert all("input stays float" in r for r in reasons)


def test_gptq_on_conv_patches_beats_mse_rounding():
    proto = wide_cnn()
    batches = calibration(proto, 4, batch=2)
    feeds = calibration(proto, 1, batch=2, seed=9)[0]
    ref = ort_run(proto, feeds)[0]
    sqnr = {}
    for method in ("gptq", "mse"):
        model = ir.serde.deserialize_model(proto)
        Calibrate(as_calibration_data(batches, model), gram_for=None)(model)
        UniformPlan(RECIPES["int4"].weights, method=method)(model)
        Quantize()(model)
        methods = {n.metadata_props.get("lpcompile.weight_method") for n in model.graph if n.op_type == "Conv"}
        assert methods == {method}
        sqnr[method] = sqnr_db(ref, ort_run(model, feeds)[0])
    assert sqnr["gptq"] > sqnr["mse"] + 0.5, sqnr


def test_weight_methods_and_spec_fitting_are_reported():
    proto = conv2d_net()
    art = lpcompile.compile(proto, format="int4", calibration=calibration(proto))
    meta = {n.name: dict(n.metadata_props) for n in art.qdq_model.graph if n.op_type in ("Conv", "ConvTranspose")}
    # GPTQ over the im2col patches' XᵀX where one group reads all inputs; mse elsewhere, with why
    assert {n: m["lpcompile.weight_method"] for n, m in meta.items()} == {
        "stem": "gptq", "grouped": "mse", "depthwise": "mse", "up": "mse", "head": "gptq"}
    assert all("grouped or transposed conv" in meta[n]["lpcompile.weight_method_note"] for n in ("grouped", "up"))
    plan = {c.name: c for c in art.plan.layers}
    assert "blocks of 16" in plan["head"].reason and meta["head"]["lpcompile.weight_format"] == "int4:block(0,16):sym"
    assert str(plan["grouped"].weights) == "int4:block(0,16):sym"  # 16 input channels per group
    assert str(plan["depthwise"].weights) == "int4:channel(1):sym"
    dq = {n.name: n for n in art.qdq_model.graph if n.op_type == "DequantizeLinear"}
    grouped = dq["grouped.weight_dequantize"]
    assert grouped.attributes["axis"].as_int() == 1 and grouped.attributes["block_size"].as_int() == 16
    assert dq["up.weight_dequantize"].attributes["axis"].as_int() == 0  # ConvTranspose [Cin, Cout, ...]: K blocks on axis 0


@pytest.mark.parametrize(("fmt", "lo", "hi"), [("int8", 0.245, 0.26), ("int4", 0.125, 0.14)])
def test_weight_bytes_over_a_cnn_are_a_quarter_and_an_eighth(fmt, lo, hi):
    proto = wide_cnn()
    art = lpcompile.compile(proto, format=fmt, calibration=calibration(proto, 2, batch=2))
    totals = art.report["totals"]
    assert totals["layers_quantized"] == 4
    ratio = totals["weight_bytes"] / totals["weight_bytes_fp32"]
    assert lo <= ratio <= hi, ratio


@pytest.mark.slow  # select measures every candidate of every layer end to end (~70 s on 2 busy cores)
def test_format_auto_chooses_per_conv_layer():
    """`--format auto` measures convs like linear layers (on their im2col patches) and the plan it
    writes quantizes them; each conv's applied format is its choice fitted to the conv weight."""
    from lpcompile.goals import Bits

    proto = conv2d_net()
    art = lpcompile.compile(proto, format="auto", goal=Bits(5.0), rotate="off", calibration=calibration(proto))
    chosen = {c.name: c for c in art.plan.layers}
    assert set(chosen) == {"stem", "grouped", "depthwise", "up", "head"}
    assert sum(c.weights is not None for c in chosen.values()) >= 4
    assert all("local_weights" in art.plan.sensitivity[n] for n in chosen)
    feeds = calibration(proto, 1, seed=9)[0]
    assert sqnr_db(ort_run(proto, feeds)[0], ort_run(art.qdq_model, feeds)[0]) >= 12.0
    for node in art.qdq_model.graph:
        c = chosen.get(node.name)
        if c is not None and c.weights is not None and node.op_type in ("Conv", "ConvTranspose"):
            applied = node.metadata_props["lpcompile.weight_format"]
            assert applied.split(":")[0] == c.weights.format.name
