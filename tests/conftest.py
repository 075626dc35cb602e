"""Shared fixtures: small ONNX models written in ONNX text, and an onnxruntime reference."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from lpcompile.metrics import sqnr_db  # noqa: F401  (tests import it from here: lpcompile's one convention)

REPO_ROOT = Path(__file__).resolve().parents[1]  # holds models/, which is not installed

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Kernel latencies (lpcompile.backends.tvm.latency) measured by tests go to a cache of this test
# session (CLI subprocesses inherit it), never the user's ~/.cache/lpcompile.
os.environ["LPCOMPILE_CACHE"] = tempfile.mkdtemp(prefix="lpcompile-test-cache-")
atexit.register(shutil.rmtree, os.environ["LPCOMPILE_CACHE"], ignore_errors=True)


def ort_run(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model (IR, ModelProto or path) in onnxruntime with graph optimizations disabled."""
    import onnxruntime as ort

    if isinstance(model, ir.Model):
        model = ir.to_proto(model)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)



def mlp_model(k: int = 256, hidden: int = 384, n: int = 64, seed: int = 0, outliers: bool = False) -> ir.Model:
    """x[B,S,k] -> MatMul+Add -> Relu -> Gemm(transB) -> MatMul, with constant weights."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((k, hidden)) / np.sqrt(k)).astype(np.float32)
    b1 = (0.1 * rng.standard_normal(hidden)).astype(np.float32)
    w2 = (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)  # stored [N, K]
    w3 = (rng.standard_normal((hidden, n)) / np.sqrt(hidden)).astype(np.float32)
    text = f"""<ir_version: 10, opset_import: ["" : 21]>
    mlp (float[B,S,{k}] x) => (float[B,S,{n}] y) {{
        h0 = MatMul(x, w1)
        h1 = Add(h0, b1)
        h2 = Relu(h1)
        flat_shape = Constant <value = int64[2] {{-1, {hidden}}}> ()
        h3 = Reshape(h2, flat_shape)
        h4 = Gemm <transB = 1> (h3, w2)
        out_shape = Shape(h2)
        h5 = Reshape(h4, out_shape)
        y = MatMul(h5, w3)
    }}"""
    proto = onnx.parser.parse_model(text)
    for name, arr in (("w1", w1), ("b1", b1), ("w2", w2), ("w3", w3)):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(arr, name))
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


@pytest.fixture
def mlp():
    return mlp_model()


@pytest.fixture
def mlp_inputs():
    rng = np.random.default_rng(1)
    return {"x": rng.standard_normal((16, 8, 256)).astype(np.float32)}


def export_model(directory: Path, name: str, *extra: str) -> Path:
    """`python -m models.export NAME DIRECTORY/NAME.onnx EXTRA...` (it writes the calibration and
    evaluation files beside it); returns the .onnx path."""
    out = Path(directory) / f"{name}.onnx"
    r = subprocess.run([sys.executable, "-m", "models.export", name, str(out), *extra],
                       capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)  # models/ is not installed
    assert r.returncode == 0, r.stderr
    return out
