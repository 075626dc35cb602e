"""canonicalize preserves exact semantics (checked in onnxruntime) and recognises what the
later passes need on real exporter output: linear layers and LayerNorm / RMSNorm."""

import numpy as np
import onnx
import onnx_ir as ir
import torch

from lpcompile.ir.patterns import PATTERN_KEY
from lpcompile.passes import Canonicalize
from models.llama import LlamaConfig, build_llama
from tests.conftest import ort_run

torch.set_num_threads(1)


def _patterns(model):
    return [n.metadata_props.get(PATTERN_KEY) for n in model.graph if n.metadata_props.get(PATTERN_KEY)]


def test_llama_export_is_canonicalized_exactly():
    cfg = LlamaConfig.tiny()
    module = build_llama(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    model = torch.onnx.export(module, (ids,), dynamo=True, opset_version=21, verbose=False).model
    before = ir.to_proto(model)
    result = Canonicalize()(model)
    feeds = {"input_ids": ids.numpy()}
    np.testing.assert_allclose(ort_run(model, feeds)[0], ort_run(before, feeds)[0], rtol=1e-5, atol=1e-6)
    found = _patterns(model)
    # per layer: q, k, v, o, gate, up, down; plus lm_head and the embedding table
    assert found.count("linear:matmul") + found.count("linear:gemm") == 7 * cfg.n_layers + 1
    assert found.count("linear:embedding") == 1
    assert found.count("norm:rmsnorm") == 2 * cfg.n_layers + 1
    assert not Canonicalize()(model).modified  # idempotent
    assert result.modified


def test_constant_subgraphs_are_folded_and_nothing_else_changes():
    text = """<ir_version: 10, opset_import: ["" : 21]>
    g (float[2,4] x) => (float[2,3] y) {
        wt = Transpose <perm = [1, 0]> (w)
        y = MatMul(x, wt)
    }"""
    proto = onnx.parser.parse_model(text)
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    model = ir.serde.deserialize_model(proto)
    Canonicalize()(model)
    assert [n.op_type for n in model.graph] == ["MatMul"]  # Transpose of a constant folded away
    assert _patterns(model) == ["linear:matmul"]
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(ort_run(model, {"x": x})[0], ort_run(proto, {"x": x})[0], rtol=1e-6)
