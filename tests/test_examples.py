"""Every script in examples/ runs (each checks its own numbers against onnxruntime or torch and
prints "OK <name>"); the CLI example's outputs are checked here against onnxruntime on the QDQ
model it wrote."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, ort_run

EXAMPLES = REPO_ROOT / "examples"


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow  # three CLI runs and a TVM build: ~1 min on 2 busy cores
def test_cli_example(tmp_path):
    pytest.importorskip("tvm")
    run(["sh", str(EXAMPLES / "cli.sh"), str(tmp_path)])
    out, calib = np.load(tmp_path / "out.npz"), np.load(tmp_path / "calib.npz")
    (ref,) = ort_run(str(tmp_path / "mlp.lpc" / "model.qdq.onnx"), {"x": calib["x"]})
    np.testing.assert_allclose(out["y"], ref, rtol=0, atol=1e-5 * np.abs(ref).max())  # W4A16: float rounding only
    assert (tmp_path / "mlp.lpc" / "report.md").exists() and (tmp_path / "mlp.lpc" / "plan.json").exists()


# the TVM-building examples are slow-marked; tests/integrations/ covers the same surfaces in the fast stage
@pytest.mark.parametrize("script, needs, takes_dir", [
    pytest.param("export_script.py", ("torch", "tvm"), True, marks=pytest.mark.slow),
    ("onnx_ir_passes.py", (), False),
    ("graphsurgeon.py", ("onnx_graphsurgeon",), False),
    pytest.param("tvm_relax.py", ("tvm",), True, marks=pytest.mark.slow),
    pytest.param("torch_compile.py", ("torch", "tvm"), False, marks=pytest.mark.slow),
    pytest.param("mlir.py", ("torch_mlir",), True, marks=pytest.mark.slow),  # tests/backends/test_mlir.py: fast
])
def test_example_runs(script, needs, takes_dir, tmp_path):
    for module in needs:
        pytest.importorskip(module)
    arg = [str(tmp_path / "out")] if takes_dir else ([str(tmp_path / "out.onnx")] if script == "onnx_ir_passes.py" else [])
    result = run([sys.executable, str(EXAMPLES / script), *arg])
    assert f"OK {Path(script).stem}" in result.stdout
