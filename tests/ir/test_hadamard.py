"""Hadamard matrices (H·Hᵀ = I for the orders real models have) and the `ai.lpcompile::Hadamard`
op, run in onnxruntime against numpy."""

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lpcompile.ir import DOMAIN
from lpcompile.ir.hadamard import (
    HADAMARD_OP,
    apply_hadamard,
    block_hadamard,
    construction,
    factor_matrices,
    hadamard,
    hadamard_function,
    has_hadamard,
    identify,
    kron_factors,
    largest_block,
    random_signs,
)
from tests.conftest import ort_run


def _assert_orthonormal(h: np.ndarray) -> None:
    n = h.shape[0]
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12 * math.sqrt(n) + 1e-13)


@pytest.mark.parametrize("n", [32, 64, 128, 256, 512, 1024, 2048, 4096, 384, 1536, 12, 20, 28, 36, 52, 344, 688])
def test_hadamard_is_orthonormal(n):
    h = hadamard(n)
    _assert_orthonormal(h)
    assert np.allclose(np.abs(h), 1 / math.sqrt(n))  # a Hadamard matrix: every entry ±1/√n


@pytest.mark.parametrize("n,factors", [
    (384, (("paley1", 12), ("sylvester", 32))),
    (1536, (("paley1", 12), ("sylvester", 128))),
    (11008, (("paley1", 344), ("sylvester", 32))),  # 344 = 7³ + 1: Paley I over GF(343)
    (5120, (("paley1", 20), ("sylvester", 256))),
    (14336, (("paley1", 28), ("sylvester", 512))),
    (13824, (("paley1", 108), ("sylvester", 128))),
    (18944, (("paley2", 148), ("sylvester", 128))),
    (36, (("paley2", 36),)),
])
def test_constructions_of_model_dimensions(n, factors):
    assert construction(n) == factors
    for f in factor_matrices(n):  # integer ±1 factors: F·Fᵀ = m·I exactly, so their ⊗ is orthogonal
        m = f.shape[0]
        assert set(np.unique(f)) == {-1, 1}
        np.testing.assert_array_equal(f.astype(np.int64) @ f.T.astype(np.int64), m * np.eye(m, dtype=np.int64))


def test_11008_is_orthonormal_without_materializing_it():
    n = 11008
    rows = np.random.default_rng(0).choice(n, 48, replace=False)
    e = np.zeros((len(rows), n))
    e[np.arange(len(rows)), rows] = 1.0
    h_rows = apply_hadamard(e, n)  # rows of H, by the O(n log n) transform
    np.testing.assert_allclose(h_rows @ h_rows.T, np.eye(len(rows)), atol=1e-12)
    np.testing.assert_allclose(np.abs(h_rows), 1 / math.sqrt(n), rtol=1e-12)
    x = np.random.default_rng(1).standard_normal((3, n))
    np.testing.assert_allclose(apply_hadamard(apply_hadamard(x, n), n, transpose=True), x, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(apply_hadamard(x, n), axis=1), np.linalg.norm(x, axis=1), rtol=1e-12)


def test_orders_without_a_construction_fall_back_to_the_largest_block():
    # 92 and 172 need Williamson-type constructions, which are not implemented
    assert construction(92) is None and construction(172) is None
    assert largest_block(92) == 4 and largest_block(172) == 4 and largest_block(232) == 8
    assert largest_block(11008) == 11008 and largest_block(11008, limit=128) == 128
    assert largest_block(688, limit=128) == 16


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 110), twos=st.integers(0, 3))
def test_every_constructible_order_is_orthonormal(k, twos):
    n = 4 * k << twos
    if not has_hadamard(n):
        return
    _assert_orthonormal(hadamard(n))


@settings(max_examples=25, deadline=None)
@given(block=st.sampled_from([1, 2, 4, 12, 16, 20, 24, 28, 48, 64, 96]), blocks=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_fast_transform_matches_the_dense_block_diagonal_matrix(block, blocks, seed):
    rng = np.random.default_rng(seed)
    n = block * blocks
    x = rng.standard_normal((5, n))
    dense = block_hadamard(n, block)
    _assert_orthonormal(dense)
    np.testing.assert_allclose(apply_hadamard(x, block), x @ dense, atol=1e-12)
    np.testing.assert_allclose(apply_hadamard(x, block, transpose=True), x @ dense.T, atol=1e-12)
    s = random_signs(n, rng)
    q = np.diag(s) @ dense  # randomized Hadamard: still orthonormal
    _assert_orthonormal(q)


@pytest.mark.parametrize("block", [12, 32, 384, 4096, 344])
def test_kron_factors_and_identify(block):
    a, s = kron_factors(block)
    np.testing.assert_allclose(np.kron(a, s), hadamard(block), atol=1e-12)
    assert identify(a, s) == construction(block)
    symmetric = np.allclose(a, a.T) and np.allclose(s, s.T)  # Sylvester matrices are
    assert identify(a.T, s.T) == (construction(block) if symmetric else (("transpose", block),) + construction(block))
    assert identify(a[::-1], s) is None


def _op_model(n: int, block: int, transpose: bool = False) -> ir.Model:
    text = f"""<ir_version: 10, opset_import: ["" : 21]>
    g (float[B,S,{n}] x) => (float[B,S,{n}] y) {{ y = Identity(x) }}"""
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    hadamard_function(model)
    a, s = kron_factors(block, np.float32)
    if transpose:
        a, s = a.T.copy(), s.T.copy()
    consts = []
    for name, arr in (("a", a), ("s", s)):
        v = ir.Value(name=name, const_value=ir.Tensor(arr, name=name))
        v.dtype, v.shape = ir.DataType.FLOAT, ir.Shape(arr.shape)
        model.graph.register_initializer(v)
        consts.append(v)
    ident = model.graph.node(0)
    node = ir.node(HADAMARD_OP, [model.graph.inputs[0], *consts], domain=DOMAIN)
    model.graph.insert_before(ident, node)
    ident.replace_input_with(0, node.outputs[0])
    return model


@pytest.mark.parametrize("n,block", [(384, 384), (384, 128), (384, 12), (256, 256), (1536, 1536), (11008, 11008)])
def test_the_op_runs_in_onnxruntime(n, block):
    x = np.random.default_rng(n + block).standard_normal((2, 3, n)).astype(np.float32)
    want = apply_hadamard(x.astype(np.float64), block)
    (got,) = ort_run(_op_model(n, block), {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    (back,) = ort_run(_op_model(n, block, transpose=True), {"x": got})
    np.testing.assert_allclose(back, x, rtol=1e-5, atol=1e-5)


def test_the_op_runs_in_the_onnx_reference_evaluator():
    from onnx.reference import ReferenceEvaluator

    x = np.random.default_rng(0).standard_normal((2, 1, 48)).astype(np.float32)
    proto = ir.to_proto(_op_model(48, 24))
    (got,) = ReferenceEvaluator(proto).run(None, {"x": x})
    np.testing.assert_allclose(got, apply_hadamard(x.astype(np.float64), 24), rtol=1e-5, atol=1e-6)


def test_the_op_needs_opset_15():
    text = """<ir_version: 7, opset_import: ["" : 13]>
    g (float[2,4] x) => (float[2,4] y) { y = Identity(x) }"""
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    with pytest.raises(ValueError, match="opset >= 15"):
        hadamard_function(model)
