"""Bounded compile memory (issue 17 item 8): copies share weights, external data stays lazy,
passes spill what they create to a TensorStore, and a LLaMA-shaped model with external data
compiles in memory bounded by its largest layer (the slow test; benchmarks/memory.py measures
MiniLM and an 8 GB model stage by stage)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import lpcompile
import lpcompile.api as api
from lpcompile.ir import save_model, to_proto
from lpcompile.ir.store import TensorStore, attach_store, new_tensor, read_weight
from lpcompile.pipeline import copy_model
from models.synthetic_llama import SyntheticLlama, write_synthetic_llama

REPO = Path(__file__).resolve().parents[1]
TINY = SyntheticLlama(hidden=256, ffn=512, heads=4, vocab=1000, layers=2)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama") / "llama.onnx"
    write_synthetic_llama(path, TINY)
    return path


def _initializers(model: ir.Model) -> dict[str, ir.TensorProtocol]:
    return {name: v.const_value for name, v in model.graph.initializers.items()}


def test_copy_shares_weights_and_edits_stay_apart(tiny_llama):
    model = ir.load(tiny_llama)
    copy = copy_model(model)
    assert all(copy.graph.initializers[n].const_value is t for n, t in _initializers(model).items())
    node = next(n for n in copy.graph if n.op_type == "MatMul")
    node.replace_input_with(1, copy.graph.initializers["lm_head"])  # an edit of the copy's structure
    assert next(n for n in model.graph if n.op_type == "MatMul").inputs[1].name != "lm_head"


def test_compile_keeps_external_weights_lazy(tiny_llama):
    art = lpcompile.compile(tiny_llama, format="int4", rotate="off")
    floats = [t for t in _initializers(art.qdq_model).values() if t.dtype == ir.DataType.FLOAT and t.size > 1 << 14]
    assert not floats  # every large float weight was quantized ...
    model = ir.load(tiny_llama)
    assert all(isinstance(t, ir.ExternalTensor) for n, t in _initializers(model).items() if t.size > 1 << 14)


def test_spilled_compile_is_the_same_model(tiny_llama, tmp_path, monkeypatch):
    """With a TensorStore (models above SPILL_MODEL_BYTES) rotated weights and codes live in a
    scratch file: the QDQ model, its outputs and the saved file are those of an in-memory compile."""
    x = {"input_ids": np.array([[1, 5, 9, 2, 7]], np.int64)}
    plain = lpcompile.compile(tiny_llama, format="int4", calibration="random:4")
    monkeypatch.setattr(api, "SPILL_MODEL_BYTES", 0)
    monkeypatch.setattr(api, "TensorStore", lambda: TensorStore(min_bytes=1024))  # this model's tensors are small
    spilled = lpcompile.compile(tiny_llama, format="int4", calibration="random:4")
    stored = [t for t in _initializers(spilled.qdq_model).values()
              if isinstance(t, ir.ExternalTensor) and "lpcompile-weights-" in str(t.base_dir)]
    assert len(stored) >= 2 * TINY.layers  # rotated and quantized weights went to the store
    assert to_proto(spilled.qdq_model).SerializeToString() == to_proto(plain.qdq_model).SerializeToString()
    untimed = lambda r: {k: v for k, v in r.items() if k not in ("stages_seconds", "calibration")}  # noqa: E731
    assert untimed(spilled.report) == untimed(plain.report)
    np.testing.assert_array_equal(spilled.run(x)["logits"], plain.run(x)["logits"])
    save_model(spilled.qdq_model, tmp_path / "m.onnx")  # stands alone: the store's data is written in
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, x)[0].shape == (1, 5, TINY.vocab)


def test_store_round_trips_and_small_tensors_stay_in_memory():
    store = TensorStore(min_bytes=1024)
    graph = ir.Graph([], [], nodes=[])
    attach_store(ir.Model(graph, ir_version=10), store)
    codes = np.arange(-8, 8, dtype=np.int8).repeat(128).reshape(64, 32)
    import ml_dtypes

    big = new_tensor(graph, codes.astype(ml_dtypes.int4), "w_q")  # packed two per byte in the file
    assert isinstance(big, ir.ExternalTensor) and big.nbytes == codes.size // 2
    np.testing.assert_array_equal(big.numpy().astype(np.int8), codes)
    assert read_weight(big).dtype == np.float32 and big.raw is None  # read, then unmapped
    assert not isinstance(new_tensor(graph, np.ones(4, np.float32), "s"), ir.ExternalTensor)
    directory = store.dir
    store.close()
    assert not directory.exists()


@pytest.mark.slow
def test_one_gb_llama_compiles_in_memory_bounded_by_its_largest_layer(tmp_path):
    """A LLaMA-shaped model of ~1 GB fp32 in external data (14 layers, hidden 1024), int4
    (W4A16: MSE rounding, no calibration), rotation on (the default): the peak RSS of the whole
    compile and save stays under the process's own baseline plus 12x the largest fp32 tensor (the
    125 MiB embedding; rotation works on float64 copies of one weight, the clipping search on
    slices). Measured: ~10x here, 8.3x on the 8.3 GB model (benchmarks/results/memory.md); the
    code before this test loaded the model whole and copied it: 7.1 GB peak for this one."""
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "memory.py"), "--synthetic-gb", "1",
                        "--workdir", str(tmp_path), "--format", "int4"],
                       capture_output=True, text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = json.loads(r.stdout).values()
    largest = row["synthetic"]["largest_tensor_mb"]
    bound = row["rss_after_imports_mb"] + 12 * largest
    assert row["peak_rss_mb"] < bound, (row["stages_peak_rss_mb"], bound)
