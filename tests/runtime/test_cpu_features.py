"""An artifact whose library uses an instruction-set extension this CPU lacks is refused with one
line when loaded (`lpcompile run/bench`: exit 2), never run into an illegal instruction. The host's
flags are faked, so the refusal is tested on every CPU (one with VNNI and AMX included)."""

from __future__ import annotations

import json
import platform

import pytest

pytest.importorskip("tvm")

from lpcompile import runtime  # noqa: E402
from lpcompile.runtime import cpu  # noqa: E402
from lpcompile.runtime.tvm import ArtifactError  # noqa: E402


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 feature flags")
@pytest.mark.parametrize("drop", ["avx2", "avx512_vnni"])
def test_a_cpu_without_a_feature_the_library_uses_refuses_it(int8_artifact, monkeypatch, capsys, drop):
    from lpcompile.runtime.cli import main

    recorded = json.loads((int8_artifact / "manifest.json").read_text())["cpu_features"]["features"]
    llvm = {v: k for k, v in cpu.CPUINFO_FLAGS["x86_64"].items()}[drop]
    if llvm not in recorded:
        pytest.skip(f"the library here does not use {llvm} (built on a CPU without it)")
    real = cpu.host_flags() or frozenset()
    monkeypatch.setattr(cpu, "host_flags", lambda: real - {drop})
    with pytest.raises(ArtifactError, match=f"uses {llvm}, which this CPU lacks"):
        runtime.load(int8_artifact)
    assert main(["bench", str(int8_artifact), "--repeat", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"uses {llvm}, which this CPU lacks" in err[0]
    monkeypatch.setattr(cpu, "host_flags", lambda: real | {drop})  # with it, the same artifact loads and runs
    assert runtime.load(int8_artifact).benchmark(repeat=1, warmup=0, batch=1, seq=2)["p50_ms"] > 0
