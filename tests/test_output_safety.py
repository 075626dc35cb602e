"""The command line never destroys what the user did not create, and bad input is one line.

Every case runs `lpcompile.cli.main` in-process (the killed-run cases in a subprocess) on a tiny
model made here, and checks the exit status, the one-line message and what is left on disk: the
user's files intact, no stray temporary folders, the previous output intact after a failure.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import lpcompile
import lpcompile.api
from lpcompile import output as output_mod
from lpcompile.cli import main
from lpcompile.errors import CalibrationError, LpcompileError
from lpcompile.output import MARKER, check_output_dir, write_output
from tests.conftest import mlp_model

K = 32


@pytest.fixture
def files(tmp_path):
    """A tiny model and its calibration data, in tmp_path/in/."""
    d = tmp_path / "in"
    d.mkdir()
    ir.save(mlp_model(k=K, hidden=64, n=16), d / "m.onnx")
    np.savez(d / "cal.npz", x=np.random.default_rng(0).standard_normal((8, 4, K)).astype(np.float32))
    return d


@pytest.fixture
def lpc(capsys):
    """Run the CLI in-process: (exit status, stderr lines)."""

    def run(*args):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse
            rc = e.code
        err = capsys.readouterr().err
        return rc, [l for l in err.splitlines() if l.strip()]

    return run


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path, with its content."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def strays(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".lpcompile-" in p.name)


def compile_args(files, *extra):
    return [files / "m.onnx", "--format", "int8", "--calibration", files / "cal.npz", "-q", *extra]


def assert_refused(result, message):
    rc, err = result
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("lpcompile: error: ") and message in err[0], err


# --- where the output goes ----------------------------------------------------------------------

def test_new_output_and_repeated_runs_into_it(files, tmp_path, lpc):
    out = tmp_path / "out"
    assert lpc(*compile_args(files, "-o", out)) == (0, [])
    first = snapshot(out)
    assert {"model.qdq.onnx", "report.json", "report.md", MARKER} <= set(first)
    assert json.loads(first[MARKER])["files"] == sorted(set(first) - {MARKER})  # what the run wrote
    assert lpc(files / "m.onnx", "--format", "int4", "--calibration", files / "cal.npz", "-q", "-o", out) == (0, [])
    assert json.loads((out / "report.json").read_text())["format"] == "int4"  # replaced by the new output
    assert lpc(*compile_args(files, "-o", out)) == (0, [])
    assert strays(tmp_path) == []


def test_empty_existing_directory_is_used(files, tmp_path, lpc):
    (tmp_path / "out").mkdir()
    assert lpc(*compile_args(files, "-o", tmp_path / "out")) == (0, [])
    assert (tmp_path / "out" / "report.json").is_file()


def test_unrelated_files_are_never_replaced(files, tmp_path, lpc):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    assert_refused(lpc(*compile_args(files, "-o", out)), "is not an lpcompile output (notes.txt)")
    assert snapshot(out) == {"notes.txt": b"keep"} and strays(tmp_path) == []


def test_a_previous_output_with_a_users_file_is_not_ours(files, tmp_path, lpc):
    out = tmp_path / "out"
    assert lpc(*compile_args(files, "-o", out))[0] == 0
    (out / "notes.txt").write_text("keep")
    before = snapshot(out)
    assert_refused(lpc(*compile_args(files, "-o", out)), "previous lpcompile output with other files (notes.txt)")
    assert snapshot(out) == before


def test_an_output_from_before_the_marker_is_recognised_by_its_report(files, tmp_path, lpc):
    out = tmp_path / "out"
    assert lpc(*compile_args(files, "-o", out))[0] == 0
    (out / MARKER).unlink()
    assert lpc(*compile_args(files, "-o", out)) == (0, [])
    (out / MARKER).unlink()
    (out / "report.json").write_text(json.dumps({"format": "int8"}))  # not lpcompile's report
    assert_refused(lpc(*compile_args(files, "-o", out)), "is not an lpcompile output")


@pytest.mark.parametrize("where, message", [
    ("{in}", "holds an input"),                       # the model's own folder
    ("{in}/m.onnx", "is an input"),                   # the model itself (an existing file)
    ("{in}/cal.npz", "is an input"),                  # the calibration file
    ("{tmp}", "holds an input"),                      # an ancestor of the model
])
def test_inputs_are_never_the_output(files, tmp_path, lpc, where, message):
    out = where.format(**{"in": files, "tmp": tmp_path})
    before = snapshot(tmp_path)
    assert_refused(lpc(*compile_args(files, "-o", out)), message)
    assert snapshot(tmp_path) == before and strays(files) == []


def test_calibration_directory_is_not_the_output(files, tmp_path, lpc):
    cal = tmp_path / "cal"
    cal.mkdir()
    np.savez(cal / "a.npz", x=np.zeros((4, 4, K), np.float32))
    assert_refused(lpc(files / "m.onnx", "--format", "int8", "--calibration", cal, "-o", cal), "is an input")
    assert sorted(p.name for p in cal.iterdir()) == ["a.npz"]


def test_the_models_external_data_is_protected(tmp_path, lpc):
    d = tmp_path / "m"
    d.mkdir()
    proto = ir.to_proto(mlp_model(k=K, hidden=64, n=16))
    (d / "weights").mkdir()
    onnx.save_model(proto, d / "m.onnx", save_as_external_data=True, location="weights/w.bin", size_threshold=0)
    assert_refused(lpc(d / "m.onnx", "--calibration", "random:4", "-o", d / "weights"), "holds an input (")
    assert (d / "weights" / "w.bin").is_file()


def test_an_existing_file_is_not_turned_into_a_directory(files, tmp_path, lpc):
    (tmp_path / "f").write_text("keep")
    assert_refused(lpc(*compile_args(files, "-o", tmp_path / "f")), "exists and is not a directory")
    assert_refused(lpc(*compile_args(files, "-o", tmp_path / "f" / "sub")), f"{tmp_path / 'f'} is not a directory")
    assert (tmp_path / "f").read_text() == "keep" and strays(tmp_path) == []


@pytest.mark.parametrize("where", [".", ".."])
def test_the_current_directory_is_not_the_output(files, tmp_path, lpc, monkeypatch, where):
    cwd = tmp_path / "empty" / "here"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    assert_refused(lpc(*compile_args(files, "-o", where)), "is the current directory")
    assert list((tmp_path / "empty").iterdir()) == [cwd] and list(cwd.iterdir()) == []


def test_an_unwritable_parent_is_one_line(files, tmp_path, lpc, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(output_mod.os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    assert_refused(lpc(*compile_args(files, "-o", ro / "out")), f"{ro} is not writable")
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "No space left on device"),
                                          (errno.EROFS, "Read-only file system"),
                                          (errno.EACCES, "Permission denied")])
def test_filesystem_errors_leave_the_previous_output(files, tmp_path, lpc, monkeypatch, code, reason):
    out = tmp_path / "out"
    assert lpc(*compile_args(files, "-o", out))[0] == 0
    before = snapshot(out)

    def failing_write(model, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(lpcompile.api, "save_model", failing_write)
    assert_refused(lpc(*compile_args(files, "-o", out)), f"cannot write output {out}: {reason}")
    assert snapshot(out) == before and strays(tmp_path) == []
    assert_refused(lpc(*compile_args(files, "-o", tmp_path / "new")), reason)
    assert not (tmp_path / "new").exists() and strays(tmp_path) == []


def test_outputs_follow_the_umask(files, tmp_path, lpc):
    old = os.umask(0o027)
    try:
        assert lpc(*compile_args(files, "-o", tmp_path / "out"))[0] == 0
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "out" / "report.json").stat().st_mode & 0o777 == 0o640


def test_ctrl_c_during_a_stage_exits_130_and_writes_nothing(files, tmp_path, lpc, monkeypatch):
    out = tmp_path / "out"
    assert lpc(*compile_args(files, "-o", out))[0] == 0
    before = snapshot(out)

    def interrupt(self, stage, done, total):
        if stage == "calibrate":
            raise KeyboardInterrupt

    monkeypatch.setattr(lpcompile.cli._Progress, "__call__", interrupt)
    rc, err = lpc(files / "m.onnx", "--format", "int8", "--calibration", files / "cal.npz", "-o", out)
    assert rc == 130 and err == ["lpcompile: interrupted"], err
    assert snapshot(out) == before and strays(tmp_path) == []


# --- interrupted runs ---------------------------------------------------------------------------

KILLED_SAVE = """
import os, signal, sys
import lpcompile.output as o
if sys.argv[1] == "fallback":       # the two-rename scheme, killed between the renames
    o._exchange = lambda a, b: False
    real = o.os.rename
    def rename(a, b):
        real(a, b)
        if ".lpcompile-old-" in str(b):
            os.kill(os.getpid(), signal.SIGKILL)
    o.os.rename = rename
else:                               # killed before the swap
    o._swap = lambda new, out: os.kill(os.getpid(), signal.SIGKILL)
from lpcompile.cli import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize("when", ["before the swap", "fallback"])
def test_a_killed_save_is_cleaned_up_by_the_next_run(files, tmp_path, lpc, when):
    out = tmp_path / "out"
    assert lpc(*compile_args(files, "-o", out))[0] == 0
    before = snapshot(out)
    r = subprocess.run([sys.executable, "-c", KILLED_SAVE, "fallback" if when == "fallback" else "swap",
                        *map(str, compile_args(files, "-o", out))], capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert strays(tmp_path), "the killed run left nothing to clean"
    if when == "fallback":
        assert not out.exists()  # the old output is parked, the new one not yet in place
    else:
        assert snapshot(out) == before
    assert lpc(*compile_args(files, "-o", out)) == (0, [])
    assert strays(tmp_path) == [] and (out / "report.json").is_file()


def test_a_parked_output_of_a_dead_run_is_put_back(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    out = tmp_path / "out"
    parked = tmp_path / f".out.lpcompile-old-{dead}-abc123"
    parked.mkdir()
    (parked / "report.md").write_text("old")
    (parked / MARKER).write_text(json.dumps({"lpcompile": 1, "files": ["report.md"]}))
    (tmp_path / f".out.lpcompile-tmp-{dead}-xyz").mkdir()
    alive = tmp_path / f".out.lpcompile-tmp-{os.getppid()}-live"  # a run still going: not touched
    alive.mkdir()
    mine = tmp_path / ".other.lpcompile-tmp-1-x"  # another output's: not touched
    mine.mkdir()

    def fail(tmp):
        raise RuntimeError("the compile failed")

    with pytest.raises(RuntimeError):
        write_output(out, fail)
    assert (out / "report.md").read_text() == "old"
    assert strays(tmp_path) == sorted([alive.name, mine.name])


# --- calibration --------------------------------------------------------------------------------

def static_batch_model(path: Path, batch: int = 4) -> Path:
    proto = onnx.parser.parse_model(f"""<ir_version: 10, opset_import: ["" : 21]>
    g (float[{batch},3,{K}] x) => (float[{batch},3,16] y) {{ y = MatMul(x, w) }}""")
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((K, 16), np.float32), "w"))
    onnx.save_model(proto, path)
    return path


def npz(**arrays):
    def make(d: Path) -> Path:
        np.savez(d / "c.npz", **arrays)
        return d / "c.npz"
    return make


def npy(d: Path) -> Path:
    np.save(d / "c.npy", np.zeros((2, 4, K), np.float32))
    return d / "c.npy"


def not_a_zip(d: Path) -> Path:
    (d / "c.npz").write_bytes(b"not a zip")
    return d / "c.npz"


@pytest.mark.parametrize("make, fmt, message", [
    (npz(x=np.zeros((0, 4, K), np.float32)), "int4", "holds no samples"),
    (npz(x=np.zeros((0, 4, K), np.float32)), "int8", "holds no samples"),
    (npy, "int8", "is a single array (.npy)"),
    (npz(y=np.zeros((2, 4, K), np.float32)), "int8", "missing model input(s) x"),
    (npz(x=np.zeros((2, 4, K + 1), np.float32)), "int8", "the model expects"),
    (npz(x=np.zeros((2, K), np.float32)), "int8", "has rank 2"),
    (npz(x=np.full((2, 4, K), "a")), "int8", "not numbers"),
    (npz(x=np.full((2, 4, K), np.inf, np.float32)), "int8", "holds inf"),
    (npz(x=np.full((2, 4, K), np.nan, np.float32)), "int8", "holds NaN"),
    (not_a_zip, "int8", "cannot read calibration file"),
])
def test_bad_calibration_is_refused_before_any_work(files, tmp_path, lpc, make, fmt, message):
    cal = make(files)
    out = tmp_path / "out"
    assert_refused(lpc(files / "m.onnx", "--format", fmt, "--calibration", cal, "-o", out), message)
    assert not out.exists() and strays(tmp_path) == []


def test_too_few_samples_for_a_static_batch(tmp_path, lpc):
    model = static_batch_model(tmp_path / "s.onnx", batch=4)
    np.savez(tmp_path / "two.npz", x=np.zeros((2, 3, K), np.float32))
    out = tmp_path / "out"
    for cal in (tmp_path / "two.npz", "random:2"):
        assert_refused(lpc(model, "--format", "int8", "--calibration", cal, "-o", out), "static batch size 4")
    assert not out.exists()
    assert lpc(model, "--format", "int8", "--calibration", "random:4", "-q", "-o", out) == (0, [])


@pytest.mark.parametrize("value", ["-4", "0", "two"])
def test_batch_size_must_be_positive(files, tmp_path, lpc, value):
    assert_refused(lpc(*compile_args(files, "--batch-size", value, "-o", tmp_path / "out")),
                   "argument --batch-size: expected a whole number >= 1")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [0, -4, 2.5, True])
def test_compile_refuses_a_bad_batch_size(files, value):
    with pytest.raises(LpcompileError, match="batch_size must be"):
        lpcompile.compile(files / "m.onnx", format="int8", calibration=files / "cal.npz", batch_size=value)


def test_in_memory_calibration_without_samples_is_refused(files):
    with pytest.raises(CalibrationError, match="holds no samples"):
        lpcompile.compile(files / "m.onnx", format="int8", calibration=[{"x": np.zeros((0, 4, K), np.float32)}])


# --- the module on its own ----------------------------------------------------------------------

def test_check_output_dir_protects_inputs_given_by_any_path(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "m.onnx").write_text("model")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    monkeypatch.chdir(tmp_path / "a")
    with pytest.raises(LpcompileError, match="holds an input"):
        check_output_dir(tmp_path / "link", [Path("m.onnx")])
    assert check_output_dir(tmp_path / "new", [Path("m.onnx")]) == tmp_path / "new"


def test_a_failed_tvm_build_keeps_the_qdq_model_and_a_report_of_the_failure(files, lpc, monkeypatch):
    """Minutes of quantization are not thrown away by a lowering bug: OUT_DIR gets the QDQ model, the
    plan and a report saying the build failed; the command still fails (one line, exit 2)."""
    import lpcompile.backends.tvm.export as export

    def broken(proto, target, out, report=None):
        (Path(out) / "model.so").write_bytes(b"half written")
        raise RuntimeError("InternalError: Check failed: something in TVM")

    monkeypatch.setattr(export, "export_artifact", broken)
    out = files.parent / "out"
    rc, err = lpc(files / "m.onnx", "--format", "int8", "--calibration", files / "cal.npz", "--emit", "tvm",
                  "-o", out, "-q")
    assert rc == 2 and len(err) == 1
    assert "tvm build failed: RuntimeError: InternalError: Check failed" in err[0] and str(out) in err[0]
    names = {p.name for p in out.iterdir()}
    assert {"model.qdq.onnx", "plan.json", "report.json", "report.md"} <= names
    assert "model.so" not in names and not any(n.startswith(".tvm") for n in names)
    report = json.loads((out / "report.json").read_text())
    assert "tvm build failed" in report["tvm"]["build_failed"]
    onnx.checker.check_model(str(out / "model.qdq.onnx"))
