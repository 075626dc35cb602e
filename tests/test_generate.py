"""Generation from a compiled KV-cache step graph (issue 13): models/kv_llama.py's step graph of the
LLaMA-shaped decoder, compiled per recipe; greedy tokens from the TVM artifact equal onnxruntime
running the same QDQ graph token by token, logits within tolerance; the cache is written in place
(the arrays TVM reads are the cache's own memory, at the same addresses every step); sampling is
reproducible; the CLI streams the same tokens and refuses bad input with exit 2.

Weight-only recipes differ from onnxruntime by fp32 summation order only. Where activations are
quantized, a value within fp32 noise of a rounding boundary may round the other way, so the logits
are compared by their distance to onnxruntime's against onnxruntime's distance to the float model."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")
torch = pytest.importorskip("torch")

import lpcompile  # noqa: E402
from lpcompile import runtime  # noqa: E402
from lpcompile.cli import main as cli_main  # noqa: E402
from lpcompile.runtime.generate import Generator, GenerationError, OrtStep, parse_token_ids, sample  # noqa: E402
from models.kv_llama import KVStep, calibration_batches, export_kv_step, float_step, reference_generate  # noqa: E402
from models.llama import LlamaConfig, build_llama  # noqa: E402

CONFIG = LlamaConfig(vocab_size=256, hidden=128, intermediate=256, n_layers=2, n_heads=4, n_kv_heads=2, max_seq=64)
PROMPT = [5, 17, 200, 42, 7, 99]
NEW = 16
WEIGHT_ONLY = ("int4", "w8a16")


def test_cached_steps_equal_full_sequence():
    """The step module (prefill, then one token at a time over the cache) gives the tokens of the
    full-sequence model recomputed from scratch each token."""
    step = KVStep(build_llama(CONFIG)).eval()
    past = [np.zeros((1, 0, CONFIG.n_kv_heads, CONFIG.head_dim), np.float32) for _ in range(2 * CONFIG.n_layers)]
    ids, got = np.array([PROMPT]), []
    for _ in range(NEW):
        logits, present = float_step(step, ids, past)
        past = [np.concatenate([a, b], 1) for a, b in zip(past, present)]
        got.append(int(logits[0, -1].argmax()))
        ids = np.array([[got[-1]]])
    assert got == reference_generate(CONFIG, PROMPT, NEW)


@pytest.fixture(scope="module")
def step_onnx(tmp_path_factory):
    return export_kv_step(CONFIG, tmp_path_factory.mktemp("kv") / "step.onnx")


_BUILT: dict = {}


def _artifact(step_onnx, tmp_path_factory, fmt):
    if fmt not in _BUILT:
        out = tmp_path_factory.mktemp(f"kv_{fmt}") / "out"
        lpcompile.compile(str(step_onnx), format=fmt, calibration=calibration_batches(CONFIG, samples=3),
                          emit=("onnx", "tvm")).save(out)
        _BUILT[fmt] = out
    return _BUILT[fmt]


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(1 - (a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("fmt", ["int4", pytest.param("w4a8"), pytest.param("int8", marks=pytest.mark.slow),
                                 pytest.param("fp8", marks=pytest.mark.slow)])
def test_greedy_equals_onnxruntime(step_onnx, tmp_path_factory, fmt):
    out = _artifact(step_onnx, tmp_path_factory, fmt)
    tvm_gen = Generator(runtime.load(out))
    got = list(tvm_gen.generate(PROMPT, NEW, keep_logits=True))
    ort_gen = Generator(OrtStep(out))
    ref = list(ort_gen.generate(PROMPT, NEW, keep_logits=True))
    assert got == ref, (fmt, got, ref)
    if fmt in WEIGHT_ONLY:
        for a, b in zip(tvm_gen.logits, ort_gen.logits):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(b).max()) + 1e-6)
        return
    # the float step graph on the same tokens: how far quantization moved the logits
    flt = Generator(OrtStep(step_onnx))
    list(flt.generate(PROMPT, 1, keep_logits=True))
    tvm_ort = _distance(tvm_gen.logits[0], ort_gen.logits[0])
    ort_flt = _distance(ort_gen.logits[0], flt.logits[0])
    assert tvm_ort <= 0.5 * ort_flt + 1e-7, (fmt, tvm_ort, ort_flt)


def test_cache_updated_in_place(step_onnx, tmp_path_factory):
    """The cache is allocated once; every step hands TVM the cache's own memory (DLPack, no copy)
    and the buffers never move."""
    gen = Generator(runtime.load(_artifact(step_onnx, tmp_path_factory, "int4")))
    step = gen.step
    addresses, steps = None, 0
    for _ in gen.generate(PROMPT, 8):
        buffers = [b.ctypes.data for b in gen.cache.buffers]
        addresses = addresses or buffers
        assert buffers == addresses
        handed = [step.last_inputs[p].data_ptr() for p in step._past_pos]
        assert handed == buffers
        steps += 1
    assert steps == 8 and gen.cache.length == len(PROMPT) + 7
    # the cache holds what onnxruntime computes for the same tokens
    ort = Generator(OrtStep(_artifact(step_onnx, tmp_path_factory, "int4")))
    list(ort.generate(PROMPT, 8))
    for a, b in zip(gen.cache.views(), ort.cache.views()):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_sampling_reproducible(step_onnx, tmp_path_factory):
    gen = Generator(runtime.load(_artifact(step_onnx, tmp_path_factory, "int4")))
    a = list(gen.generate(PROMPT, 8, temperature=0.9, top_k=20, seed=3))
    b = list(gen.generate(PROMPT, 8, temperature=0.9, top_k=20, seed=3))
    greedy = list(gen.generate(PROMPT, 8))
    assert a == b
    assert list(gen.generate(PROMPT, 8, temperature=0.9, top_k=1, seed=5)) == greedy


def test_sample_top_k():
    logits = np.array([0.0, 5.0, 4.0, -1.0])
    rng = np.random.default_rng(0)
    draws = {sample(logits, rng, 1.0, 2) for _ in range(200)}
    assert draws == {1, 2}
    assert sample(logits, None, 0.0, None) == 1


def test_generate_cli(step_onnx, tmp_path_factory, capsys):
    out = _artifact(step_onnx, tmp_path_factory, "int4")
    ids = ",".join(map(str, PROMPT))
    assert cli_main(["generate", str(out), "--prompt-ids", ids, "--max-new-tokens", "6"]) == 0
    tvm_line = capsys.readouterr().out.strip()
    assert cli_main(["generate", str(out), "--prompt-ids", ids, "--max-new-tokens", "6", "--onnxruntime"]) == 0
    assert capsys.readouterr().out.strip() == tvm_line
    assert tvm_line == ",".join(map(str, list(Generator(runtime.load(out)).generate(PROMPT, 6))))
    assert cli_main(["bench", str(out), "--decode", "--prompt-len", "8", "--new-tokens", "4", "--repeat", "1",
                     "--json"]) == 0
    assert '"decode_tok_s"' in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--prompt-ids", "1,x"], "comma-separated integers"),
    (["--prompt-ids", "1,9999"], "outside the vocabulary"),
    (["--prompt-ids", "1", "--max-new-tokens", "0"], "must be positive"),
])
def test_generate_cli_bad_input(step_onnx, tmp_path_factory, capsys, argv, message):
    out = _artifact(step_onnx, tmp_path_factory, "int4")
    assert cli_main(["generate", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_generate_cli_not_a_step_graph(tmp_path, capsys):
    assert cli_main(["generate", str(tmp_path / "missing"), "--prompt-ids", "1"]) == 2
    assert "no such artifact" in capsys.readouterr().err


def test_parse_token_ids():
    assert parse_token_ids("1, 2,3") == [1, 2, 3]
    with pytest.raises(GenerationError):
        parse_token_ids("")
    with pytest.raises(GenerationError):
        parse_token_ids("-1")


def test_capacity_refused(step_onnx, tmp_path_factory):
    gen = Generator(OrtStep(_artifact(step_onnx, tmp_path_factory, "int4")), max_context=CONFIG.max_seq)
    with pytest.raises(GenerationError, match="context"):
        next(gen.generate(PROMPT, CONFIG.max_seq))
