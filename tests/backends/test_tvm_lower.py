"""Whole QDQ models through the TVM lowering against onnxruntime on the same graph.

Activation quantization is applied to the graph input only: a quantizer fed by a previous
layer may legitimately round one element differently (a value within fp32 noise of a .5
boundary), which a tight tolerance cannot absorb; deeper layers use float activations with
quantized weights, where the only difference is fp32 summation order.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

from lpcompile.backends.tvm.lower import compile_model  # noqa: E402
from tests.backends.test_tvm_kernels import TARGET, assert_close, per_token_function  # noqa: E402
from tests.conftest import ort_run  # noqa: E402


class GraphBuilder:
    """A tiny ONNX graph writer for QDQ linear stacks (MatMul weights [K, N], Gemm [N, K])."""

    def __init__(self, k: int, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.functions = [], [], []
        self.k, self.cur, self.count = k, "x", 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def init(self, array: np.ndarray, base: str) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], domain: str = "", **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], domain=domain, **attrs))
        self.cur = out
        return out

    def static_qdq(self, dtype) -> None:
        qmax = 127.0 if dtype == np.int8 else float(ml_dtypes.finfo(dtype).max)
        s = self.init(np.array(4.0 / qmax, np.float32), "sx")
        z = self.init(np.array(0, dtype), "zx")
        q = self.node("QuantizeLinear", [self.cur, s, z])
        self.node("DequantizeLinear", [q, s, z])

    def per_token(self) -> None:
        if not self.functions:
            self.functions.append(per_token_function())
        self.node("PerTokenQDQ_int8", [self.cur], domain="ai.lpcompile")

    def linear(self, n: int, dtype, block: int | None, gemm: bool = False, bias: bool = False) -> None:
        k = self.k
        shape = (n, k) if gemm else (k, n)
        if dtype in (ml_dtypes.int4, np.int8):
            lim = 8 if dtype == ml_dtypes.int4 else 128
            q = self.rng.integers(-lim, lim, shape).astype(dtype)
        else:
            q = (self.rng.standard_normal(shape) * 4).astype(dtype)
        k_axis, n_axis = (1, 0) if gemm else (0, 1)
        if block:
            sshape = list(shape)
            sshape[k_axis] = -(-k // block)
            scale, attrs = self.rng.uniform(0.5, 1.5, sshape) / np.sqrt(k) / 4, {"axis": k_axis, "block_size": block}
        else:
            scale, attrs = self.rng.uniform(0.5, 1.5, n) / np.sqrt(k) / 4, {"axis": n_axis}
        w = self.node("DequantizeLinear", [self.init(q, "wq"), self.init(scale.astype(np.float32), "ws")], **attrs)
        x = self.cur_input
        if gemm:
            inputs = [x, w] + ([self.init(self.rng.standard_normal(n).astype(np.float32), "b")] if bias else [])
            self.node("Gemm", inputs, transB=1)
        else:
            self.node("MatMul", [x, w])
            if bias:
                self.node("Add", [self.cur, self.init(self.rng.standard_normal(n).astype(np.float32), "b")])
        self.k = n

    @property
    def cur_input(self) -> str:
        return self._input

    def begin_linear(self) -> None:
        self._input = self.cur

    def relu(self) -> None:
        self.node("Relu", [self.cur])

    def model(self, dims: list) -> onnx.ModelProto:
        """dims: the input's; the output has the same leading dims and the last layer's width."""
        graph = helper.make_graph(
            self.nodes,
            "qdq_mlp",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
            [helper.make_tensor_value_info(self.cur, TensorProto.FLOAT, [*dims[:-1], self.k])],
            initializer=self.inits,
        )
        opsets = [helper.make_opsetid("", 21)] + ([helper.make_opsetid("ai.lpcompile", 1)] if self.functions else [])
        model = helper.make_model(graph, opset_imports=opsets, functions=self.functions, ir_version=10)
        onnx.checker.check_model(model)
        return model


def mlp(first: str, k: int = 256, hidden: int = 384, n: int = 64) -> onnx.ModelProto:
    """(activation QDQ) linear + bias -> Relu -> int4 blocked -> Relu -> fp8 per-channel + bias.

    "weight_only" is 2-D (tokens, k) with Gemm(transB) layers (ONNX Gemm is 2-D only); the
    others take x[B, S, k] through MatMul layers.
    """
    g = GraphBuilder(k)
    gemm = first == "weight_only"
    g.begin_linear()
    if first == "int8_static":
        g.static_qdq(np.int8)
        g.begin_linear()
        g.linear(hidden, np.int8, None, bias=True)
    elif first == "fp8_static":
        g.static_qdq(ml_dtypes.float8_e4m3fn)
        g.begin_linear()
        g.linear(hidden, ml_dtypes.float8_e4m3fn, None, bias=True)
    elif first == "w4a8":
        g.per_token()
        g.begin_linear()
        g.linear(hidden, ml_dtypes.int4, 128, bias=True)
    else:
        g.linear(hidden, ml_dtypes.int4, 128, gemm=True, bias=True)
    g.relu()
    g.begin_linear()
    g.linear(hidden, ml_dtypes.int4, 128)
    g.relu()
    g.begin_linear()
    g.linear(n, ml_dtypes.float8_e5m2 if first == "fp8_static" else ml_dtypes.float8_e4m3fn, None, gemm=gemm, bias=True)
    return g.model(["T", k] if gemm else ["B", "S", k])


def run_vm(ex, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


@pytest.mark.parametrize(
    "first,fired",
    [
        ("weight_only", "Gemm[float32 x int4]"),
        ("int8_static", "MatMul[int8 x int8]"),
        ("fp8_static", "MatMul[float8_e4m3fn x float8_e4m3fn]"),
        ("w4a8", "MatMul[int8 x int4]"),
    ],
)
def test_qdq_mlp_matches_ort(first, fired):
    model = mlp(first)
    ex, report = compile_model(model, TARGET)
    assert report.fired[fired] == 1, report
    assert report.fired["MatMul[float32 x int4]"] == 1 and sum(report.fired.values()) >= 3, report
    for b, s in ((2, 5), (1, 1)):  # dynamic batch and sequence; one token
        shape = (b * s, 256) if first == "weight_only" else (b, s, 256)
        x = np.random.default_rng(b * 10 + s).standard_normal(shape).astype(np.float32)
        assert_close(run_vm(ex, x), ort_run(model, {"x": x})[0])


def test_unmatched_quantized_values_fall_back_exactly():
    """Does not fire: a per-token int8 activation feeding int8 weights (no row-scaled int8 x int8
    kernel) and a dequantized weight used by an Add keep their exact float meaning."""
    g = GraphBuilder(128)
    g.begin_linear()
    g.per_token()
    g.begin_linear()
    g.linear(128, np.int8, None)
    table = g.node(
        "DequantizeLinear",
        [g.init(np.arange(-64, 64, dtype=np.int8).reshape(1, 128), "tq"), g.init(np.array(0.01, np.float32), "ts")],
    )
    g.node("Add", [g.nodes[-2].output[0], table])  # the linear's output + the dequantized table
    model = g.model(["B", 128])
    ex, report = compile_model(model, TARGET)
    assert report.fired["MatMul[float32 x int8]"] == 1, report
    assert any("no row-scaled int8 x int8 kernel" in r for r in report.refused), report.refused
    x = np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32)
    assert_close(run_vm(ex, x), ort_run(model, {"x": x})[0])


def test_online_hadamard_lowers_and_matches_ort():
    """A rotated (online Hadamard), int4-weight MLP: the Hadamard op is lowered, not refused."""
    import onnx_ir as ir

    from lpcompile.formats import QuantSpec
    from lpcompile.passes import Quantize, Rotate, UniformPlan
    from tests.conftest import mlp_model

    model = mlp_model()
    Rotate(mode="online")(model)
    UniformPlan(QuantSpec.parse("int4:block(0,128):sym"))(model)
    Quantize()(model)
    proto = ir.to_proto(model)
    assert any(n.op_type == "Hadamard" for n in proto.graph.node)
    ex, report = compile_model(proto, TARGET)
    assert report.fired["Hadamard[fwht]"] >= 1
    x = np.random.default_rng(0).standard_normal((2, 4, 256)).astype(np.float32)
    assert_close(run_vm(ex, x), ort_run(proto, {"x": x})[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "dtype,axis,block,asym",
    [
        (ml_dtypes.uint4, 1, 32, True),  # lpcompile's embedding recipe: uint4 asym, blocks of 32 along D
        (ml_dtypes.int4, 1, 32, False),
        (np.int8, 0, None, False),  # one scale per row
        (np.uint8, 1, None, True),  # one scale per column
        (ml_dtypes.int4, None, None, False),  # one scale for the table
        (ml_dtypes.float8_e4m3fn, 1, None, False),  # the fp8 recipe's per-column E4M3 table
        (ml_dtypes.float8_e5m2, 0, None, False),
    ],
)
def test_quantized_embedding_gather_stays_low_bit_and_matches_ort(dtype, axis, block, asym):
    rng = np.random.default_rng(0)
    v, d = 50, 64
    if "float8" in np.dtype(dtype).name:  # every finite fp8 code
        q = rng.integers(0, 256, (v, d)).astype(np.uint8).view(dtype)
        q[~np.isfinite(q.astype(np.float32))] = 0
    else:
        info = ml_dtypes.iinfo(dtype)
        q = rng.integers(info.min, info.max + 1, (v, d)).astype(dtype)
    if axis is None:
        sshape = ()
    elif block:
        sshape = (v, d // block)
    else:
        sshape = (v,) if axis == 0 else (d,)
    scale = rng.uniform(0.01, 0.1, sshape).astype(np.float32)
    inits = [numpy_helper.from_array(q, "tq"), numpy_helper.from_array(scale, "ts")]
    dq_inputs = ["tq", "ts"]
    if asym:
        inits.append(numpy_helper.from_array(rng.integers(info.min, info.max + 1, sshape).astype(dtype), "tz"))
        dq_inputs.append("tz")
    attrs = {} if axis is None else {"axis": axis, **({"block_size": block} if block else {})}
    nodes = [helper.make_node("DequantizeLinear", dq_inputs, ["table"], **attrs),
             helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)]
    graph = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", d])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    ex, report = compile_model(model, TARGET)
    assert report.fired[f"Gather[{np.dtype(dtype).name}]"] == 1, report
    ids = rng.integers(-v, v, (3, 7)).astype(np.int64)  # negative indices count from the end
    np.testing.assert_array_equal(run_vm(ex, ids), ort_run(model, {"ids": ids})[0])
    from lpcompile.backends.tvm.export import _lift_constants
    from lpcompile.backends.tvm.lower import from_onnx

    _, params = _lift_constants(from_onnx(model, TARGET)[0])  # the table as stored: its codes, low-bit
    codes = [p.numpy() for p in params.values() if str(p.dtype) != "float32"]
    bits = 4 if dtype in (ml_dtypes.int4, ml_dtypes.uint4) else 8
    assert max(c.nbytes for c in codes) == v * d * bits // 8
    assert all(p.numpy().size < v * d for p in params.values() if str(p.dtype) == "float32")


# --- the online Hadamard op: fast Walsh–Hadamard kernel vs the ONNX function in onnxruntime -------


def hadamard_model(n: int, block, *, signs: bool, inverse: bool = False, s=None) -> onnx.ModelProto:
    """y = Hadamard(x ⊙ signs, a, s) with the rotate pass's factors (`kron_factors(block)`, or
    for block = (heads, width) its cross-head factors H_heads and I_width; or their transposes),
    as the model-local ONNX function the pass registers."""
    import onnx_ir as ir

    from lpcompile.ir.hadamard import hadamard, hadamard_function, kron_factors

    holder = ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": 21}), ir_version=10)
    function = ir.serde.serialize_function(hadamard_function(holder))
    if isinstance(block, tuple):
        a, s_ = hadamard(block[0], np.float32), np.eye(block[1], dtype=np.float32)
    else:
        a, s_ = kron_factors(block, np.float32)
    if inverse:
        a, s_ = np.ascontiguousarray(a.T), np.ascontiguousarray(s_.T)
    inits = [numpy_helper.from_array(a, "a"), numpy_helper.from_array(s_ if s is None else s, "s")]
    nodes, x = [], "x"
    if signs:
        sg = np.random.default_rng(n).choice([-1.0, 1.0], n).astype(np.float32)
        inits.append(numpy_helper.from_array(sg, "signs"))
        nodes.append(helper.make_node("Mul", ["x", "signs"], ["xs"]))
        x = "xs"
    nodes.append(helper.make_node("Hadamard", [x, "a", "s"], ["y"], domain="ai.lpcompile"))
    graph = helper.make_graph(
        nodes, "hadamard",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", n])],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("ai.lpcompile", 1)]
    model = helper.make_model(graph, opset_imports=opsets, functions=[function], ir_version=10)
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize(
    "n,block,signs,inverse",
    [
        (256, 32, True, False),  # 4 blocks; Sylvester a ⊗ s joins the butterflies (t = 32)
        (4096, 4096, True, False),  # one radix-16 step + 8 butterfly stages
        (384, 384, True, False),  # MiniLM hidden: paley1(12) ⊗ 32
        (1536, 1536, False, False),  # MiniLM intermediate: paley1(12) ⊗ 128
        (1536, 1536, True, True),  # the inverse transform (transposed factors)
        (96, 48, True, False),  # paley1(12) ⊗ 4: fewer than 16 lanes
        (96, 12, True, False),  # no Sylvester factor at all
        (11008, 11008, True, False),  # LLaMA-7B MLP: paley1(344) ⊗ 32
        (384, (12, 32), False, False),  # across 12 heads of 32 (rotate's cross_head): paley1(12) ⊗ I32
        (384, (12, 32), False, True),
        (1024, (8, 64), False, False),  # across 8 heads of 64: sylvester(8) ⊗ I64, butterflies from h = 64
    ],
)
def test_hadamard_fast_kernel_matches_ort(n, block, signs, inverse):
    from lpcompile.backends.tvm.lower import from_onnx

    model = hadamard_model(n, block, signs=signs, inverse=inverse)
    mod, report = from_onnx(model, TARGET)
    assert report.fired["Hadamard[fwht]"] == 1 and not report.fired["Hadamard[dense factors]"]
    text = mod.script()
    assert "R.matmul" not in text and "R.multiply" not in text  # no dense factors; signs fused
    ex = tvm.compile(mod, target=TARGET)
    x = np.random.default_rng(n).standard_normal((2, 3, n)).astype(np.float32)
    x[..., 5] = 40.0  # an outlier channel, what the transform is for
    assert_close(run_vm(ex, x), ort_run(model, {"x": x})[0], rtol=1e-5, atol=2e-6)


def test_hadamard_without_sylvester_factor_falls_back_to_dense_factors():
    """An s that is orthogonal but not Sylvester's: the fast kernel does not fire (reason given),
    the dense lowering still computes the op exactly."""
    from lpcompile.backends.tvm.lower import from_onnx

    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((32, 32)))
    model = hadamard_model(384, 384, signs=True, s=q.astype(np.float32))
    mod, report = from_onnx(model, TARGET)
    assert report.fired["Hadamard[dense factors]"] == 1 and not report.fired["Hadamard[fwht]"]
    assert any("neither the orthonormal Sylvester matrix nor an identity" in r for r in report.refused), report.refused
    ex = tvm.compile(mod, target=TARGET)
    x = np.random.default_rng(1).standard_normal((2, 3, 384)).astype(np.float32)
    assert_close(run_vm(ex, x), ort_run(model, {"x": x})[0], rtol=1e-5, atol=2e-6)
