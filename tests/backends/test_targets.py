"""Target specs (`llvm`, `aarch64[:CPU]`, `cuda[:sm_XX]`), cross-compilation for 64-bit Arm Linux,
and formats a target cannot run refused before any work."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil

import numpy as np
import pytest

pytest.importorskip("tvm")

import lpcompile  # noqa: E402
from lpcompile import runtime  # noqa: E402
from lpcompile.backends.tvm.target import CROSS_CC_ENV, cross_linker, is_cross, resolve  # noqa: E402
from lpcompile.errors import TargetError  # noqa: E402
from lpcompile.runtime.tvm import ArtifactError  # noqa: E402
from tests.conftest import mlp_model  # noqa: E402

EM_AARCH64 = 183  # ELF e_machine


def test_specs_resolve():
    host = resolve("llvm")
    assert host.kind.name == "llvm" and not is_cross(host)
    arm = resolve("aarch64")
    assert str(arm.attrs["mtriple"]) == "aarch64-linux-gnu" and is_cross(arm) == (platform.machine() != "aarch64")
    assert str(resolve("aarch64:neoverse-v1").attrs["mcpu"]) == "neoverse-v1"
    assert str(resolve("cuda:sm_89").attrs["arch"]) == "sm_89"
    assert str(resolve("cuda").attrs["arch"]) == "sm_80"


@pytest.mark.parametrize("spec,match", [("cuda:sm_70", "unsupported CUDA arch"), ("aarch64:pentium", "unknown aarch64 CPU"),
                                        ("x86", "unknown target"), ("llvm:znver5", "takes no CPU name"),
                                        ("cuda:sm_90a", "use cuda:sm_90"), ("cuda:banana", "unknown CUDA arch")])
def test_bad_specs_are_refused(spec, match):
    with pytest.raises(TargetError, match=match):
        resolve(spec)


def test_fp8_on_a_gpu_without_fp8_is_refused_before_any_work(tmp_path):
    with pytest.raises(TargetError, match="sm_89"):
        lpcompile.compile(mlp_model(), target="cuda:sm_86", format="fp8", calibration="random:4", emit=("onnx", "tvm"))


def test_missing_cross_linker_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(CROSS_CC_ENV, raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TargetError, match="cross linker"):
        cross_linker(resolve("aarch64"))


@pytest.mark.skipif(importlib.util.find_spec("ziglang") is None and shutil.which("aarch64-linux-gnu-gcc") is None
                    and not os.environ.get(CROSS_CC_ENV), reason="no aarch64 cross linker (pip install ziglang)")
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_aarch64_artifact_is_an_arm_shared_library(tmp_path, fmt):
    """Cross-compiled and cross-linked: an AArch64 ELF shared object, weights low-bit as on the
    host, the manifest saying the machine; loading it here is refused with the reason. (No Arm
    machine here: it is not run.)"""
    cal = tmp_path / "c.npz"
    np.savez(cal, x=np.random.default_rng(0).standard_normal((8, 8, 256)).astype(np.float32))
    out = lpcompile.compile(mlp_model(), target="aarch64", format=fmt, calibration=cal,
                            emit=("onnx", "tvm")).save(tmp_path / "arm")
    head = (out / "model.so").read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and head[4] == 2  # 64-bit
    assert int.from_bytes(head[16:18], "little") == 3  # ET_DYN: a shared library
    assert int.from_bytes(head[18:20], "little") == EM_AARCH64
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["machine"] == "aarch64" and manifest["fallbacks"] == []
    assert all(l["status"] == "native" for l in manifest["layers"])
    if platform.machine() != "aarch64":
        with pytest.raises(ArtifactError, match="compiled for aarch64"):
            runtime.load(out)
