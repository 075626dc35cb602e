"""Missing optional dependencies are one line, exit 2, before any work; steps a run did not ask
for never import them (issue 15 item 5). TVM, torch, OpenVINO and torch-mlir are made to look
uninstalled by an import hook in a subprocess (a sitecustomize), not by uninstalling them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx_ir as ir
import pytest

from lpcompile.extras import EXTRAS, MissingExtra, install_hint, installed, require
from tests.conftest import REPO_ROOT, mlp_model

BLOCKED = ("tvm", "tvm_ffi", "torch", "openvino", "torch_mlir")

SITECUSTOMIZE = textwrap.dedent('''
    import os, sys

    class _Uninstalled:
        """Modules named in LP_BLOCK look uninstalled; each import attempt is appended to LP_BLOCK_LOG
        (importlib.util.find_spec asks without importing: not logged)."""
        names = tuple(n for n in os.environ["LP_BLOCK"].split(",") if n)

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] not in self.names:
                return None
            if sys._getframe(2).f_code.co_name != "find_spec":
                with open(os.environ["LP_BLOCK_LOG"], "a") as f:
                    f.write(name + "\\n")
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, _Uninstalled())
''')


@pytest.fixture(scope="module")
def without_extras(tmp_path_factory):
    """run(args) -> (CompletedProcess, imports attempted): `python -m lpcompile ARGS` with the
    optional packages hidden."""
    d = tmp_path_factory.mktemp("no_extras")
    (d / "hook").mkdir()
    (d / "hook" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    model = d / "mlp.onnx"
    ir.save(mlp_model(), model)
    np.savez(d / "x.npz", x=np.zeros((1, 2, 256), np.float32))
    log = d / "imports.log"

    def run(*args):
        log.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(d / "hook"), str(REPO_ROOT)]),
               "LP_BLOCK": ",".join(BLOCKED), "LP_BLOCK_LOG": str(log), "OMP_NUM_THREADS": "2"}
        r = subprocess.run([sys.executable, "-m", "lpcompile", *[a.format(d=d) for a in args]],
                           capture_output=True, text=True, timeout=300, env=env, cwd=d)
        return r, (log.read_text().split() if log.exists() else [])

    return d, run


def _one_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_emit_tvm_without_tvm_names_the_extra_before_any_work(without_extras):
    d, run = without_extras
    r, imports = run("{d}/mlp.onnx", "--emit", "onnx,tvm", "-o", "{d}/out_tvm", "-q")
    assert r.returncode == 2
    assert _one_line(r) == "lpcompile: error: --emit tvm needs apache-tvm: pip install 'lpcompile[tvm]'"
    assert not (d / "out_tvm").exists() and imports == []


@pytest.mark.parametrize("command, what", [("run", "running a compiled artifact"), ("bench", "timing a compiled artifact")])
def test_run_and_bench_without_tvm_name_the_extra(without_extras, command, what):
    d, run = without_extras
    (d / "art").mkdir(exist_ok=True)
    r, imports = run(command, "{d}/art", "--inputs", "{d}/x.npz")
    assert r.returncode == 2
    assert _one_line(r) == f"lpcompile {command}: error: {what} needs apache-tvm: pip install 'lpcompile[tvm]'"
    assert imports == []


def test_a_latency_goal_without_tvm_is_refused_before_any_work(without_extras):
    d, run = without_extras
    r, imports = run("{d}/mlp.onnx", "--format", "auto", "--budget-latency", "100", "--calibration", "random:8",
                     "-o", "{d}/out_lat", "-q")
    assert r.returncode == 2
    assert "pip install 'lpcompile[tvm]'" in _one_line(r)
    assert not (d / "out_lat").exists() and imports == []


@pytest.mark.parametrize("args", [
    ("--format", "int8", "--calibration", "random:8"),
    ("--format", "auto", "--budget", "6", "--calibration", "random:8"),  # the report's latency line: not measured
])
def test_steps_not_asked_for_never_import_optional_packages(without_extras, args):
    d, run = without_extras
    out = d / f"out_{args[1]}"
    r, imports = run("{d}/mlp.onnx", *args, "--emit", "onnx", "-o", str(out), "-q")
    assert r.returncode == 0, r.stderr
    assert imports == []
    assert (out / "model.qdq.onnx").exists()


def test_the_default_compile_without_tvm_names_the_extra_and_the_qdq_only_way(without_extras):
    """The default --emit builds code for the target: without TVM that is one line, before any
    work, naming the extra and `--emit onnx`."""
    d, run = without_extras
    r, imports = run("{d}/mlp.onnx", "--format", "int8", "--calibration", "random:8", "-o", "{d}/out_default", "-q")
    assert r.returncode == 2
    line = _one_line(r)
    assert "apache-tvm: pip install 'lpcompile[tvm]'" in line and "--emit onnx" in line
    assert not (d / "out_default").exists() and imports == []


def test_require_names_the_distribution_and_the_extra(monkeypatch):
    assert set(EXTRAS) == {"tvm", "torch", "openvino", "torch_mlir"}
    assert install_hint("openvino") == "openvino: pip install 'lpcompile[openvino]'"
    assert not installed("no_such_module_lpcompile")
    monkeypatch.setitem(EXTRAS, "no_such_module_lpcompile", ("nothing", "nothing"))
    with pytest.raises(MissingExtra, match=r"^the step needs nothing: pip install 'lpcompile\[nothing\]'$"):
        require("no_such_module_lpcompile", "the step")
