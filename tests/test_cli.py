"""The command line as a user runs it: a real subprocess, real files."""

import json
import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest

from tests.conftest import mlp_model, ort_run, sqnr_db


def lpcompile(*args, cwd=None, emit="onnx"):
    """`python -m lpcompile.cli ARGS`; a compile without --emit writes the QDQ model alone (`emit`:
    the TVM build the default adds is tested once, in test_default_compiles_code_for_the_target)."""
    args = [str(a) for a in args]
    if emit and args and args[0] not in ("run", "bench") and not args[0].startswith("-") and "--emit" not in args:
        args += ["--emit", emit]
    return subprocess.run([sys.executable, "-m", "lpcompile.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "mlp.onnx"
    ir.save(mlp_model(), path)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((32, 8, 256)).astype(np.float32))
    return path


def test_compile_writes_the_qdq_model_and_reports(model_file, tmp_path):
    out = tmp_path / "out.lpc"
    r = lpcompile(model_file, "--target", "llvm", "--format", "int8", "--calibration", tmp_path / "calib.npz",
                  "-o", out, "--exclude", ":last")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "model.qdq.onnx", "plan.json", "report.json", "report.md"]  # plan.json: every run writes its plan
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "int8" and report["target"] == "llvm"
    layers = {l["name"]: l for l in report["layers"]}
    assert set(layers) == {"w1", "w2"}  # w3 is the last linear layer: excluded
    for l in layers.values():
        assert l["weight_format"] == "int8:channel(1):sym" and l["activation_format"] == "uint8:tensor:asym"
        assert l["weight_bytes"] < l["weight_bytes_fp32"] / 3.9 and l["sqnr_db"] > 25
    t = report["totals"]
    for key in ("weight_bytes_fp32", "weight_bytes", "output_sqnr_db", "output_cosine"):
        assert t[key] is not None
    # the report's numbers are the QDQ model's real numbers in onnxruntime, on the calibration
    # samples held out from fitting (the 4th batch of 4)
    assert report["measured_on"]["held_out"] and report["measured_on"]["samples"] == 8
    x = {"x": np.random.default_rng(0).standard_normal((32, 8, 256)).astype(np.float32)[24:]}
    measured = sqnr_db(ort_run(ir.load(model_file), x)[0], ort_run(ir.load(out / "model.qdq.onnx"), x)[0])
    assert abs(measured - t["output_sqnr_db"]) < 0.01
    assert "| w1 | MatMul |" in (out / "report.md").read_text()
    assert "calibrate:" in r.stderr  # progress was shown


def test_default_output_dir_and_random_smoke_run(model_file):
    r = lpcompile(model_file, "--format", "int4", "--calibration", "random:4")
    assert r.returncode == 0, r.stderr
    out = model_file.with_name("mlp.lpc")
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["is_random"]
    assert "Smoke run" in (out / "report.md").read_text() and "smoke run" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.onnx"], "no such model file"),
        (["{bad}"], "not a valid ONNX model"),
        (["{model}", "--format", "int3"], "invalid choice"),
        (["{model}", "--target", "tpu"], "unknown target"),
        (["{model}", "--target", "cuda:sm_75", "--emit", "onnx,tvm"], "unsupported CUDA arch"),
        (["{model}", "--target", "cuda:sm_86", "--format", "fp8", "--calibration", "random:2", "--emit", "onnx,tvm"], "needs FP8 kernels"),
        (["{model}", "--format", "int8"], "needs calibration data"),
        (["{model}", "--format", "int8", "--calibration", "{nan}"], "holds NaN"),
        (["{model}", "--format", "int8", "--calibration", "{wrong}"], "missing model input"),
        (["{model}", "--emit", "wasm"], "cannot emit"),
    ],
)
def test_bad_input_is_one_line_nonzero_and_leaves_nothing(model_file, tmp_path, args, message):
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage that is not protobuf")
    np.savez(tmp_path / "nan.npz", x=np.full((2, 8, 256), np.nan, np.float32))
    np.savez(tmp_path / "wrong.npz", y=np.zeros((2, 8, 256), np.float32))
    subst = {"{model}": model_file, "{bad}": tmp_path / "bad.onnx", "{nan}": tmp_path / "nan.npz",
             "{wrong}": tmp_path / "wrong.npz"}
    before = set(tmp_path.iterdir())
    r = lpcompile(*[subst.get(a, a) for a in args], "-o", tmp_path / "out", cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lpcompile: error:") and message in lines[0], r.stderr
    assert set(tmp_path.iterdir()) == before  # no output dir, no temporary left behind


# --- --format auto ---------------------------------------------------------------------------------


def test_auto_writes_a_plan_that_meets_the_budget_and_can_be_reused(model_file, tmp_path):
    out = tmp_path / "auto.lpc"
    r = lpcompile(model_file, "--format", "auto", "--budget", "6", "--calibration", tmp_path / "calib.npz",
                  "--rotate", "off", "-o", out)
    assert r.returncode == 0, r.stderr
    assert {"plan.json", "select.png", "report.md"} <= {p.name for p in out.iterdir()}
    assert "select: end-to-end:" in r.stderr and "goal met: True" in r.stdout
    assert "better of auto/off" not in r.stdout  # --rotate given: one basis only
    report = json.loads((out / "report.json").read_text())
    sel = report["select"]
    assert sel["budget"] == {"kind": "bits", "value": 6.0}
    assert sel["achieved"]["avg_weight_bits"] <= 6.0 and sel["achieved"]["budget_met"]
    md = (out / "report.md").read_text()
    assert "## Format selection" in md and "![per-layer sensitivity and the chosen format](select.png)" in md
    plan = json.loads((out / "plan.json").read_text())
    assert [l["name"] for l in plan["layers"]] == ["w1", "w2", "w3"]
    assert all(l["rotation"] == "none" and l["reason"] and l["weights"] for l in plan["layers"])
    # reuse with a pin: no sensitivity run, the pinned layer takes the pinned format
    plan["pins"] = {"w2": {"weights": "int8:channel(1):sym"}}
    (tmp_path / "edited.json").write_text(json.dumps(plan))
    again = tmp_path / "again.lpc"
    r = lpcompile(model_file, "--format", "auto", "--plan", tmp_path / "edited.json", "--calibration",
                  tmp_path / "calib.npz", "--rotate", "off", "-o", again)
    assert r.returncode == 0, r.stderr
    assert "select:" not in r.stderr
    layers = {l["name"]: l["weight_format"] for l in json.loads((again / "report.json").read_text())["layers"]}
    expected = {l["name"]: l["weights"] for l in plan["layers"]}
    expected["w2"] = "int8:channel(1):sym"
    assert layers == {k: v for k, v in expected.items() if v != "float"}


@pytest.mark.parametrize("args, message", [
    (["--format", "int4", "--budget", "4.5"], "apply to format='auto' only"),
    (["--format", "auto"], "needs one goal"),
    (["--format", "auto", "--budget", "4.5", "--min-cosine", "0.99"], "one goal at a time"),
    (["--format", "auto", "--budget", "0.2"], "not an average weight bit width"),
    (["--format", "auto", "--budget-bytes", "-5"], "must be positive"),
    (["--format", "auto", "--min-cosine", "1.5"], "must lie in (0, 1)"),
    (["--format", "auto", "--plan", "missing.json"], "plan file not found"),
    (["--format", "auto", "--budget", "4.5"], "needs calibration data"),
    (["--format", "auto", "--budget-latency", "0"], "positive number of microseconds"),
    (["--format", "auto", "--budget-latency", "100", "--budget-bytes", "1e6"], "one goal at a time"),
    (["--format", "auto", "--budget-latency", "100", "--target", "aarch64"], "needs kernel timings on target aarch64"),
    (["--format", "auto", "--budget-latency", "100", "--latency-tokens", "0"], "latency tokens must be"),
    (["--format", "w4a8", "--budget-latency", "100"], "apply to format='auto' only"),
])
def test_auto_bad_input_is_one_line_and_exit_2(model_file, tmp_path, args, message):
    r = lpcompile(model_file, *args, "-o", tmp_path / "x.lpc", cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.lpc").exists()


def test_auto_without_rotate_says_which_basis_it_kept(model_file, tmp_path):
    r = lpcompile(model_file, "--format", "auto", "--budget", "6", "--calibration", tmp_path / "calib.npz",
                  "-o", tmp_path / "rot.lpc")
    assert r.returncode == 0, r.stderr
    assert "(better of auto/off)" in r.stdout and "goal met: True" in r.stdout
    report = json.loads((tmp_path / "rot.lpc" / "report.json").read_text())
    assert set(report["rotate"]["chosen_from"]) == {"auto", "off"}
    assert report["rotate"]["mode"] == report["select"]["rotation_chosen"]


def test_auto_latency_budget_from_the_command_line(model_file, tmp_path):
    out = tmp_path / "lat.lpc"
    r = lpcompile(model_file, "--format", "auto", "--budget-latency", "1e6", "--latency-tokens", "4", "--calibration",
                  tmp_path / "calib.npz", "--rotate", "off", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "latency: timing kernels:" in r.stderr and "us at 4 tokens, goal met: True" in r.stdout
    plan = json.loads((out / "plan.json").read_text())
    assert plan["budget"] == {"kind": "latency", "value": 1e6, "unit": "us", "tokens": 4}
    assert all(l["latency_us"] > 0 for l in plan["layers"])


def test_python_m_lpcompile_prints_the_version():
    from importlib import metadata

    r = subprocess.run([sys.executable, "-m", "lpcompile", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"lpcompile {metadata.version('lpcompile')}"


def test_help_names_the_run_and_bench_commands():
    r = lpcompile("--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())  # argparse wraps lines
    assert "lpcompile run OUT_DIR" in text and "lpcompile bench OUT_DIR" in text


def test_the_repository_models_package_is_not_installed(tmp_path):
    """`models/` serves the demo, tests and benchmarks from the repository root; the installed
    distribution must not claim a top-level package of that name."""
    from importlib import metadata

    dist = metadata.distribution("lpcompile")
    assert "models" not in (dist.read_text("top_level.txt") or "").split()
    assert not [f for f in dist.files or [] if str(f).startswith("models/")]
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('models') is None)"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert r.stdout.strip() == "True", r.stderr


def test_default_compiles_code_for_the_target(model_file, tmp_path):
    """`lpcompile MODEL --target T --format F` is a compiler's command: the QDQ model and the TVM
    artifact (`--emit onnx` keeps QDQ-only output, as the other tests here ask)."""
    out = tmp_path / "default.lpc"
    r = lpcompile(model_file, "--format", "int8", "--calibration", tmp_path / "calib.npz", "-o", out, emit=None)
    assert r.returncode == 0, r.stderr
    names = {p.name for p in out.iterdir()}
    assert {"model.qdq.onnx", "report.json", "model.so", "params.bin", "manifest.json"} <= names
