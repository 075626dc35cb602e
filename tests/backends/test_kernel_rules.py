"""Kernel dispatch is one ordered rule list per target kind (`kernels.rules`): the first rule that
applies wins, every rule before it says why it did not, and lowering, scheduling and the latency
model ask the same list."""

from __future__ import annotations

import pytest

pytest.importorskip("tvm")

from lpcompile import targets  # noqa: E402
from lpcompile.backends.tvm import kernels as K  # noqa: E402
from lpcompile.backends.tvm.kernels import rules  # noqa: E402
from lpcompile.backends.tvm.kernels.rules import MatmulSpec, choose  # noqa: E402
from lpcompile.backends.tvm.lower import kernel_choice  # noqa: E402
from lpcompile.backends.tvm.target import cuda_target, describe, host_target  # noqa: E402

VNNI_CPU = targets.cpu_target("llvm", None, frozenset({"avx2", "avx512f", "avx512_vnni"}))
AVX2_CPU = targets.cpu_target("llvm", None, frozenset({"avx2"}))
NO_SIMD_CPU = targets.cpu_target("llvm", None, frozenset())
W8A8 = MatmulSpec("uint8", "int8", k=384, n=1536, block=384)


def test_every_list_ends_with_the_generic_rule_that_always_applies():
    for kind, rule_list in rules.RULES.items():
        assert rule_list[-1].name == "generic" and rule_list[-1].dot4 is None
        assert len({r.name for r in rule_list}) == len(rule_list), kind


def test_first_rule_that_applies_wins_and_the_earlier_ones_say_why_not():
    c = choose(VNNI_CPU, W8A8)
    assert c.rule.name == "vnni-u8s8-gemm" and c.dot4
    assert c.refused == {"avx512-int4-gemv": "float x int4 only"}
    # N not a whole number of 64-wide tiles: the VNNI kernel refuses, AVX2's (16-wide) takes it
    c = choose(VNNI_CPU, MatmulSpec("uint8", "int8", k=384, n=48, block=384))
    assert c.rule.name == "avx2-u8s8-gemm" and c.dot4
    assert c.refused["vnni-u8s8-gemm"] == "N 48 not a multiple of 64"
    # neither fits: the VNNI layout stays (generic schedule)
    c = choose(VNNI_CPU, MatmulSpec("uint8", "int8", k=384, n=40, block=384))
    assert c.rule.name == "dot4-generic" and c.dot4
    # no VNNI: AVX2's exact vpmaddwd kernel on the same dot4 layout
    c = choose(AVX2_CPU, W8A8)
    assert c.rule.name == "avx2-u8s8-gemm" and c.dot4
    assert c.refused["vnni-u8s8-gemm"] == "needs AVX-512 VNNI"
    # N not whole 16-wide tiles: the layout stays, the generic schedule reads it
    c = choose(AVX2_CPU, MatmulSpec("uint8", "int8", k=384, n=40, block=384))
    assert c.rule.name == "dot4-generic" and c.refused["avx2-u8s8-gemm"] == "N 40 not a multiple of 16"
    # neither VNNI nor AVX2: plain layout, generic schedule; each rule names what is missing
    c = choose(NO_SIMD_CPU, W8A8)
    assert c.rule.name == "generic" and not c.dot4
    assert c.refused["vnni-u8s8-gemm"] == "needs AVX-512 VNNI" and c.refused["avx2-u8s8-gemm"] == "needs AVX2"
    assert c.refused["dot4-generic"] == "needs AVX-512 VNNI or AVX2"
    # W4A8: VNNI's kernel, else AVX2's, on the nibble8 layout; without either the plain one
    w4a8 = MatmulSpec("int8", "int4", k=384, n=1536, block=128)
    assert choose(VNNI_CPU, w4a8).rule.name == "vnni-w4a8-gemm"
    c = choose(AVX2_CPU, w4a8)
    assert c.rule.name == "avx2-w4a8-gemm" and c.dot4 and c.refused["vnni-w4a8-gemm"] == "needs AVX-512 VNNI"
    assert choose(NO_SIMD_CPU, w4a8).rule.name == "generic"


def test_int4_gemv_only_for_one_row():
    spec = MatmulSpec("float32", "int4", k=512, n=256, block=128, rows=1)
    assert choose(VNNI_CPU, spec).rule.name == "avx512-int4-gemv"
    c = choose(VNNI_CPU, MatmulSpec("float32", "int4", k=512, n=256, block=128, rows=None))
    assert c.rule.name == "generic" and c.refused["avx512-int4-gemv"] == "one row (GEMV) only"
    assert choose(AVX2_CPU, spec).refused["avx512-int4-gemv"] == "needs AVX-512"


def test_a_definition_whose_layout_is_fixed_is_refused_by_rules_of_the_other_layout():
    c = choose(VNNI_CPU, MatmulSpec("uint8", "int8", k=384, n=1536, block=384, dot4=False))
    assert c.rule.name == "generic"
    assert c.refused["vnni-u8s8-gemm"] == c.refused["dot4-generic"] == "weights not in the dot4 layout"


def test_cuda_rules():
    sm80, sm89 = targets.parse("cuda:sm_80"), targets.parse("cuda:sm_89")
    fp8 = MatmulSpec("float8_e4m3fn", "float8_e4m3fn", k=256, n=256, block=128)
    assert choose(sm89, fp8).rule.name == "mma-tensor-core"
    c = choose(sm80, fp8)
    assert c.rule.name == "generic" and c.refused["mma-tensor-core"] == "FP8 mma needs sm_89+"
    assert choose(sm80, W8A8).rule.name == "mma-tensor-core"
    c = choose(sm80, MatmulSpec("float32", "int4", k=4096, n=4096, block=128, rows=1))
    assert c.rule.name == "cuda-int4-split-k" and not c.dot4
    c = choose(sm80, MatmulSpec("float32", "int4", k=4096, n=4096, block=64))
    assert c.rule.name == "generic" and "multiple of 128" in c.refused["cuda-int4-split-k"]


def test_a_definition_gets_the_kernel_its_spec_chooses():
    """Scheduling reads the spec off the definition: the rule lowering reported is the one that
    builds it."""
    host = host_target()
    func = K.quantized_matmul(1, 512, 256, weight="int4", block_size=128)
    spec = MatmulSpec.of(func)
    assert (spec.rows, spec.k, spec.n, spec.block, spec.dot4, spec.accumulator_only) == (1, 512, 256, 128, False, False)
    expected = "avx512-int4-gemv" if describe(host).has("avx512f") else "generic"
    assert choose(describe(host), spec).rule.name == expected
    _, c = kernel_choice(host, None, "int4", 512, 256, 128, rows=1)
    assert c.rule.name == expected


def test_lowering_asks_the_same_rules_on_cuda():
    for arch, want in (("sm_80", False), ("sm_89", True)):
        native, c = kernel_choice(cuda_target(arch), ("float8_e4m3fn", "tensor"), "float8_e4m3fn", 256, 256, 128)
        assert native and c.dot4 == want and (c.rule.name == "mma-tensor-core") == want
    native, c = kernel_choice(cuda_target("sm_80"), ("int8", "row"), "int8", 256, 256, 128)  # no per-token x int8 kernel
    assert not native and not c.dot4


def test_the_lowering_report_names_each_layers_rule():
    """A W8A8 MatMul (uint8 activations, per-channel int8 weights): the report names the rule that
    schedules its kernel, and why the rules before it did not apply."""
    import numpy as np
    from onnx import TensorProto, checker, helper, numpy_helper

    from lpcompile.backends.tvm.lower import from_onnx

    k, n = 256, 128
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "xs"), numpy_helper.from_array(np.array(128, np.uint8), "xz"),
             numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "wq"),
             numpy_helper.from_array(np.full(n, 0.01, np.float32), "ws")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dqx"),
             helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], name="dqw", axis=1),
             helper.make_node("MatMul", ["xd", "w"], ["y"], name="linear")]
    graph = helper.make_graph(nodes, "w8a8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    checker.check_model(model)
    host = host_target()
    _, report = from_onnx(model, host)
    layer = report.layers["linear"]
    _, lowered = kernel_choice(host, ("uint8", "tensor"), "int8", k, n, k, rows=1)
    built = choose(describe(host), MatmulSpec("uint8", "int8", k, n, k, rows=1, dot4=lowered.dot4))
    assert layer["rule"] == built.rule.name and layer["rules_refused"] == built.refused
    assert layer["status"] == "native" and ("(dot4)" in layer["kernel"]) == lowered.dot4
