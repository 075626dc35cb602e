"""The integrations name the extra they need in one line when it is missing (TVM / torch hidden
by an import hook in a subprocess, as in tests/test_extras.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.test_extras import SITECUSTOMIZE


def run_hidden(code: str, hidden: str, tmp_path) -> subprocess.CompletedProcess:
    (tmp_path / "hook").mkdir(exist_ok=True)
    (tmp_path / "hook" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), str(REPO_ROOT)]),
           "LP_BLOCK": hidden, "LP_BLOCK_LOG": str(tmp_path / "imports.log"), "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def test_relax_passes_without_tvm(tmp_path):
    r = run_hidden("import lpcompile.integrations.tvm", "tvm,tvm_ffi", tmp_path)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == (
        "lpcompile.extras.MissingExtra: lpcompile.integrations.tvm needs apache-tvm: pip install 'lpcompile[tvm]'")


def test_torch_compile_backend_without_tvm(tmp_path):
    pytest.importorskip("torch")
    code = ("import torch, lpcompile.integrations.torch as t\n"
            "try:\n"
            "    t.backend(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)), [torch.zeros(1, 2)])\n"
            "except Exception as e:\n"
            "    print(type(e).__name__, e)\n")
    r = run_hidden(code, "tvm,tvm_ffi", tmp_path)
    assert r.stdout.strip() == "MissingExtra torch.compile(backend='lpcompile') needs apache-tvm: pip install 'lpcompile[tvm]'"
