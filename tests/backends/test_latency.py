"""The latency model: it times the kernels the lowering emits, once per kernel (then the cache),
and refuses targets it cannot run."""

from __future__ import annotations

import json

import onnx_ir as ir
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402

import lpcompile  # noqa: E402
from lpcompile.backends.tvm import latency as L  # noqa: E402
from lpcompile.backends.tvm.latency import LatencyModel, LinearShape, kernels_for, why_unmeasurable  # noqa: E402
from lpcompile.backends.tvm.lower import from_onnx  # noqa: E402
from lpcompile.backends.tvm.target import resolve  # noqa: E402
from lpcompile.errors import TargetError  # noqa: E402
from lpcompile.formats import QuantSpec  # noqa: E402
from lpcompile.ir.patterns import find_linear_layers  # noqa: E402
from lpcompile.recipes import get_recipe  # noqa: E402
from tests.conftest import mlp_model  # noqa: E402

INT4 = QuantSpec.parse("int4:block(0,128):sym")


def _spec(s):
    return None if s is None else (s if isinstance(s, QuantSpec) else QuantSpec.parse(str(s)))


@pytest.mark.parametrize("fmt", ["int4", "w4a8", "w8a16", "int8", "fp8"])
def test_the_kernels_timed_are_the_kernels_the_lowering_emits(fmt):
    """For each layer of a QDQ model, the matmul kernel `kernels_for` names (activation dtype,
    weight dtype, dot4 layout) is the one the lowering reports for that layer."""
    recipe = get_recipe(fmt)
    art = lpcompile.compile(mlp_model(), format=fmt, calibration="random:8", rotate="off")
    target = resolve("llvm")
    proto = ir.to_proto(art.qdq_model)
    for i, node in enumerate(proto.graph.node):  # the lowering reports layers by node name
        node.name = node.name or f"{node.op_type}_{i}"
    _, report = from_onnx(proto, target)
    lowered = sorted(v["kernel"] for v in report.layers.values())
    timed = []
    for layer in find_linear_layers(mlp_model().graph):
        shape = LinearShape(1, layer.in_features, layer.out_features)
        kernel = kernels_for(target, shape, _spec(recipe.weights), _spec(recipe.activations))[-1]
        timed.append(f"{kernel.activation} x {kernel.weight}" + (" (dot4)" if kernel.dot4 else ""))
    assert len(lowered) == 3 and sorted(timed) == lowered


def test_pairs_without_a_native_kernel_are_not_timed():
    target = resolve("llvm")
    shape = LinearShape(1, 256, 256)
    assert isinstance(kernels_for(target, shape, QuantSpec.parse("int8:channel(1):sym"),
                                  QuantSpec.parse("int8:token:sym:dynamic")), str)  # int8 x int8 needs tensor scales
    assert isinstance(kernels_for(target, shape, None, QuantSpec.parse("int8:token:sym:dynamic")), str)
    assert isinstance(kernels_for(target, shape, QuantSpec.parse("uint4:block(0,32):asym"), None), str)
    # a quantized input adds its quantize kernel
    w4a8 = kernels_for(target, shape, INT4, QuantSpec.parse("int8:token:sym:dynamic"))
    assert [k.kind for k in w4a8] == ["quantize_rows", "matmul"]
    # the one-row kernel only where the model fixes one row
    assert kernels_for(target, LinearShape(1, 256, 256, static=True), INT4, None)[0].static
    assert not kernels_for(target, shape, INT4, None)[0].static


def test_each_kernel_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    requests = [(LinearShape(4, 128, 128), INT4, None), (LinearShape(4, 128, 128), None, None)]
    first = LatencyModel("llvm", cache_dir=tmp_path)
    got = first.table(requests)
    assert first.built == 2 and all(v > 0 for v in got.values())
    entries = json.loads((tmp_path / L.CACHE_FILE).read_text())["entries"]
    assert len(entries) == 2
    assert all(str(resolve("llvm").attrs["mcpu"]) in key and L.source_hash() in key for key in entries)

    def no_build(self, kernel):
        raise AssertionError(f"rebuilt {kernel.signature}")

    monkeypatch.setattr(LatencyModel, "_measure", no_build)
    again = LatencyModel("llvm", cache_dir=tmp_path)
    assert again.table(requests) == got and again.built == 0
    # changed kernel sources are measured afresh
    monkeypatch.setattr(L, "source_hash", lambda: "changed")
    with pytest.raises(AssertionError, match="rebuilt"):
        LatencyModel("llvm", cache_dir=tmp_path).table(requests[:1])


def test_a_damaged_cache_is_measured_again(tmp_path):
    (tmp_path / L.CACHE_FILE).write_text("{not json")
    model = LatencyModel("llvm", cache_dir=tmp_path)
    assert model.layer_us(LinearShape(4, 128, 128), INT4, None) > 0 and model.built == 1


def test_int4_gemv_is_faster_than_the_float_matmul():
    """A one-token 1024x1024 layer: 0.5 MiB of int4 weights against 4 MiB of fp32 (measured here:
    about 20 us against milliseconds for the static one-row float matmul the backend emits).
    Only where the int4 GEMV kernel runs (AVX-512): on an AVX2-only Zen 2 the generic schedule
    measured 94 us against 68 for float (issue 12 item 3, open)."""
    from lpcompile.targets import parse

    if not parse("llvm").has("avx512f"):
        pytest.skip("no int4 GEMV kernel for this CPU (needs AVX-512): the generic schedule is not faster than float")
    model = LatencyModel("llvm")  # the test session's cache (conftest)
    shape = LinearShape(1, 1024, 1024, static=True)
    assert model.layer_us(shape, INT4, None) < model.layer_us(shape, None, None)


def test_targets_that_cannot_run_here_are_refused():
    assert why_unmeasurable(resolve("llvm")) is None
    assert "cross-compiled" in why_unmeasurable(resolve("aarch64"))
    with pytest.raises(TargetError, match="cannot measure kernel latency.*cross-compiled"):
        LatencyModel("aarch64").check()
    if not tvm.cuda(0).exist:
        assert "no CUDA GPU" in why_unmeasurable(resolve("cuda:sm_90"))
