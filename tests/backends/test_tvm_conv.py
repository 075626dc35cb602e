"""Quantized convolutions through the TVM backend: the artifact against onnxruntime running the
same QDQ model, on 1-D and 2-D convs (plain, strided, dilated, grouped, 1x1), with what runs
natively (im2col + the quantized_matmul kernels) and what does not (depthwise: emulated;
ConvTranspose: float fallback) stated in the manifest; the artifact holds low-bit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tvm")

import lpcompile  # noqa: E402
from lpcompile import runtime  # noqa: E402
from models.convnets import calibration, conv1d_net, conv2d_net  # noqa: E402
from tests.conftest import ort_run  # noqa: E402

NATIVE = {"conv2d_net": {"stem", "grouped", "head"}, "conv1d_net": {"c1", "c2"}}


@pytest.mark.parametrize(("net", "fmt"), [(conv2d_net, "int8"), (conv2d_net, "int4"), (conv1d_net, "fp8")])
def test_conv_artifact_matches_onnxruntime(net, fmt, tmp_path):
    proto = net()
    feeds = calibration(proto, 1, batch=3, seed=7)[0]
    art = lpcompile.compile(proto, format=fmt, calibration=calibration(proto), emit=("onnx", "tvm"))
    out = art.save(tmp_path / fmt)
    ref = ort_run(art.qdq_model, feeds)[0]
    model = runtime.load(out)
    got = model.run(feeds)[model.output_names[0]]
    # one summation order against another; a quantized input is the same codes in both (the
    # per-tensor Q of these small nets lands no value on a rounding boundary: checked exactly)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6
    layers = {l["name"]: l for l in json.loads((out / "manifest.json").read_text())["layers"]}
    native = {n for n, l in layers.items() if l["status"] == "native"}
    integer_depthwise = net is conv2d_net and fmt == "int8"  # taps on uint8 x int8 codes
    assert native == NATIVE[net.__name__] | ({"depthwise"} if integer_depthwise else set()), layers
    assert all(layers[n]["kernel"].startswith("im2col + ") for n in native - {"depthwise"})
    if integer_depthwise:
        assert layers["depthwise"]["kernel"] == "depthwise integer taps uint8 x int8"
    elif net is conv2d_net:
        assert layers["depthwise"]["status"] == "emulated" and "depthwise" in layers["depthwise"]["reason"]
        assert layers["up"]["status"] != "native" and "ConvTranspose" in layers["up"]["reason"]
    if fmt in ("int8", "fp8"):
        activation = {"int8": "uint8", "fp8": "float8_e4m3fn"}[fmt]
        assert all(layers[n]["kernel"].startswith(f"im2col + {activation} x") for n in native - {"depthwise"})
    # the weights travel as low-bit codes: the only float32 weights in params.bin are the
    # ConvTranspose's (float fallback) plus scales and biases
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = {i.name.removesuffix(".weight"): int(np.prod(i.dims)) * 4 for i in proto.graph.initializer
             if i.name.endswith(".weight")}
    assert manifest["params_by_dtype"].get("float32", 0) <= sizes.get("up", 0) + 0.1 * sum(sizes.values())


@pytest.mark.slow  # nvcc on the generated source: ~2 min on 2 busy cores
@pytest.mark.skipif(__import__("shutil").which("nvcc") is None, reason="needs nvcc (CUDA targets are compiled with it)")
def test_conv_builds_for_cuda_with_native_kernels(tmp_path):
    """The same lowering for `cuda:sm_90`: im2col GEMMs on the CUDA quantized_matmul kernels,
    compiled by nvcc into the artifact's fatbin (numerics: the shared compute checked on CPU above;
    run on a GPU by scripts/gpu-check where one is lent)."""
    proto = conv2d_net()
    art = lpcompile.compile(proto, target="cuda:sm_90", format="int8", calibration=calibration(proto),
                            emit=("onnx", "tvm"))
    out = art.save(tmp_path / "cuda")
    layers = {l["name"]: l for l in json.loads((out / "manifest.json").read_text())["layers"]}
    # int8 inputs: the depthwise conv runs on integer taps there too (as on the CPU test above)
    assert {n for n, l in layers.items() if l["status"] == "native"} == NATIVE["conv2d_net"] | {"depthwise"}
    assert layers["depthwise"]["kernel"] == "depthwise integer taps uint8 x int8"
    assert any(p.suffix == ".fatbin" and p.stat().st_size > 0 for p in out.iterdir())


@pytest.mark.slow  # exports a transformers ConvNeXt and builds it (~2 min)
def test_convnext_int8_every_conv_native_and_equal_to_onnxruntime(tmp_path):
    """A `transformers` ConvNeXt (random weights, symbolic batch): its 4x4 stem, 2x2 downsamplers
    and 7x7 depthwise convs all run natively in int8 (depthwise on integer taps)."""
    pytest.importorskip("transformers")
    from models import hf_tiny

    model = hf_tiny.capture("convnext-tiny")
    rng = np.random.default_rng(0)
    cal = [hf_tiny.feeds("convnext-tiny", rng, 4) for _ in range(4)]
    feeds = hf_tiny.feeds("convnext-tiny", np.random.default_rng(5), 3)
    art = lpcompile.compile(model, format="int8", calibration=cal, emit=("onnx", "tvm"))
    out = art.save(tmp_path / "int8")
    ref = ort_run(art.qdq_model, feeds)[0]
    loaded = runtime.load(out)
    got = loaded.run(feeds)[loaded.output_names[0]]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6
    layers = json.loads((out / "manifest.json").read_text())["layers"]
    convs = [l for l in layers if l["op"] == "Conv"]
    assert len(convs) == 8 and all(l["status"] == "native" for l in layers), layers
