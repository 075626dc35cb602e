import numpy as np
import onnx
import onnx_ir as ir

from lpcompile.ir.patterns import find_linear_layers, find_norms, why_not_linear


def _model(text: str, **weights) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    for name, arr in weights.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(arr, np.float32), name))
    return ir.serde.deserialize_model(proto)


HEADER = '<ir_version: 10, opset_import: ["" : 21]>'


def test_matmul_with_bias_gemm_and_embedding_are_linear():
    m = _model(
        HEADER
        + """
        g (float[2,8] x, int64[2,3] ids) => (float[2,4] y, float[2,4] z, float[2,3,8] e) {
            a = MatMul(x, w)
            y = Add(a, b)
            z = Gemm <transB = 1> (x, wt, b)
            e = Gather(table, ids)
        }""",
        w=np.ones((8, 4)), b=np.ones(4), wt=np.ones((4, 8)), table=np.ones((10, 8)),
    )
    layers = {l.kind: l for l in find_linear_layers(m.graph)}
    assert set(layers) == {"matmul", "gemm", "embedding"}
    mm = layers["matmul"]
    assert (mm.in_features, mm.out_features, mm.transposed) == (8, 4, False)
    assert mm.bias.name == "b" and mm.output.name == "y"
    gemm = layers["gemm"]
    assert (gemm.in_features, gemm.out_features, gemm.transposed) == (8, 4, True)
    assert gemm.storage_axis(0) == 1 and gemm.storage_axis(1) == 0
    emb = layers["embedding"]
    assert emb.activation is None and (emb.in_features, emb.out_features) == (8, 10)


def test_does_not_fire_on_activation_times_activation_or_graph_input_weights():
    m = _model(
        HEADER
        + """
        g (float[2,8] x, float[8,4] w_in) => (float[2,4] y, float[2,2] z) {
            y = MatMul(x, w_in)
            xt = Transpose(x)
            z = MatMul(x, xt)
        }"""
    )
    assert find_linear_layers(m.graph) == []
    reasons = {why_not_linear(n) for n in m.graph if n.op_type == "MatMul"}
    assert reasons == {"second input is not a constant 2-D float weight"}


def test_decomposed_rmsnorm_and_layernorm_are_recognised():
    m = _model(
        HEADER
        + """
        g (float[2,8] x) => (float[2,8] y, float[2,8] ln) {
            two = Constant <value = float {2.0}> ()
            eps = Constant <value = float {1e-6}> ()
            axes = Constant <value = int64[1] {-1}> ()
            sq = Pow(x, two)
            ms = ReduceMean(sq, axes)
            mse = Add(ms, eps)
            rt = Sqrt(mse)
            inv = Reciprocal(rt)
            nx = Mul(x, inv)
            y = Mul(nx, gamma)
            ln = LayerNormalization <axis = -1> (x, gamma, beta)
        }""",
        gamma=np.ones(8), beta=np.zeros(8),
    )
    norms = find_norms(m.graph)
    assert sorted(n.kind for n in norms) == ["layernorm", "rmsnorm"]
    rms = next(n for n in norms if n.kind == "rmsnorm")
    assert rms.scale.name == "gamma" and rms.output.name == "y" and rms.input.name == "x"


def test_mean_of_squares_without_normalisation_is_not_rmsnorm():
    m = _model(
        HEADER
        + """
        g (float[2,8] x) => (float[2,1] y) {
            sq = Mul(x, x)
            axes = Constant <value = int64[1] {-1}> ()
            y = ReduceMean(sq, axes)
        }"""
    )
    assert find_norms(m.graph) == []
