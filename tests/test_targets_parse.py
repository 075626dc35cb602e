"""Target specs parsed once into one description (`lpcompile.targets`): every bad spec is a
one-line TargetError, good specs normalise, formats a target cannot run are refused, and what is
emulated or cannot be timed here is said."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from lpcompile import targets
from lpcompile.errors import TargetError
from lpcompile.extras import MissingExtra
from lpcompile.targets import FP8, parse

HAS_TVM = importlib.util.find_spec("tvm") is not None


@pytest.mark.parametrize("spec,match", [
    ("", "empty target"),
    ("   ", "empty target"),
    ("x86", "unknown target 'x86'"),
    ("gpu:sm_89", "unknown target"),
    ("llvm:znver5", "takes no CPU name"),
    ("llvm:", "names nothing after ':'"),
    ("cuda:", "names nothing after ':'"),
    ("cuda:sm_75", r"unsupported CUDA arch 'sm_75' \(the kernels need sm_80\+\)"),
    ("cuda:sm_70", "unsupported CUDA arch"),
    ("cuda:sm_90a", "use cuda:sm_90"),
    ("cuda:sm_100", "unsupported CUDA arch 'sm_100'"),
    ("cuda:banana", "unknown CUDA arch 'banana'"),
    ("cuda:sm_89:x", "unknown CUDA arch"),
    ("cuda:\nsm_89", "unknown CUDA arch"),
    pytest.param("aarch64:notacpu", "unknown aarch64 CPU 'notacpu'",
                 marks=pytest.mark.skipif(not HAS_TVM, reason="checking a CPU name asks LLVM (apache-tvm)")),
])
def test_every_bad_spec_is_a_one_line_target_error(spec, match):
    with pytest.raises(TargetError, match=match) as e:
        parse(spec)
    assert "\n" not in str(e.value) and str(e.value)


def test_a_target_that_is_not_a_string_is_refused():
    with pytest.raises(TargetError, match="a target is a string"):
        parse(None)


@pytest.mark.parametrize("spec,normal", [("llvm", "llvm"), (" LLVM ", "llvm"), ("cuda", "cuda:sm_80"),
                                         ("cuda:sm_89", "cuda:sm_89"), ("CUDA:SM_90", "cuda:sm_90"),
                                         ("aarch64", "aarch64:generic"), ("aarch64:generic", "aarch64:generic")])
def test_good_specs_normalise(spec, normal):
    t = parse(spec)
    assert t.spec == str(t) == normal and parse(t.spec) == t


def test_what_each_target_runs():
    sm80, sm89, host, arm = parse("cuda:sm_80"), parse("cuda:sm_89"), parse("llvm"), parse("aarch64")
    assert (sm80.kind, sm80.arch, sm80.sm) == ("cuda", "sm_80", 80)
    assert sm80.unavailable_formats == FP8 and not sm80.emulated_formats and "mma_fp8" not in sm80.features
    assert FP8 <= sm89.native_formats and not sm89.unavailable_formats and sm89.has("mma_fp8")
    for cpu in (host, arm):  # no FP8 arithmetic on CPUs: dequantized in the kernel
        assert cpu.is_cpu and cpu.emulated_formats == FP8 and not cpu.unavailable_formats and cpu.sm is None
        assert {"int4", "int8", "uint8"} <= cpu.native_formats
    assert arm.cpu == "generic" and arm.has("neon")
    assert host.features <= set(targets.CPU_FEATURES)


def test_host_features_come_from_the_cpu_flags(monkeypatch):
    flags = frozenset("fpu sse avx2 avx512f avx512_vnni amx_tile amx_int8 avx_vnni".split())
    monkeypatch.setattr(targets, "host_flags", lambda: flags)
    assert targets.host_features() == {"avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8", "avx_vnni"}
    monkeypatch.setattr(targets, "host_flags", lambda: None)  # no /proc/cpuinfo
    assert targets.host_features() == frozenset()


def test_fp8_below_sm89_is_refused_and_elsewhere_allowed():
    with pytest.raises(TargetError, match=r"format 'fp8' needs FP8 kernels: CUDA sm_89\+ \(target cuda:sm_80\); "
                                          "use --target cuda:sm_89 or cuda:sm_90"):
        parse("cuda:sm_80").check_formats(["fp8_e4m3"], "fp8")
    parse("cuda:sm_80").check_formats(["int4", "int8", "uint8"], "w8a8")
    for spec in ("cuda:sm_89", "cuda:sm_90", "llvm", "aarch64"):
        parse(spec).check_formats(sorted(FP8), "fp8")


def test_select_options():
    assert parse("cuda:sm_86").select_options() == {"emulated": FP8, "allow_emulated": False}
    assert parse("llvm").select_options() == {"emulated": FP8}
    assert parse("cuda:sm_90").select_options() == {"emulated": frozenset()}


def test_parsing_needs_no_tvm():
    code = ("import sys; from lpcompile import targets; "
            "[targets.parse(s) for s in ('llvm', 'aarch64', 'cuda:sm_89')]; "
            "print('tvm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_without_tvm_a_cpu_name_check_says_so_in_one_line(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tvm" else find_spec(name, *a))
    targets._aarch64_cpus.cache_clear()
    targets._parse.cache_clear()
    try:
        with pytest.raises(MissingExtra, match=r"needs apache-tvm: pip install 'lpcompile\[tvm\]'"):
            parse("aarch64:neoverse-v1")
        assert "apache-tvm is not installed (pip install 'lpcompile[tvm]')" in parse("cuda:sm_89").timing_unavailable()
        with pytest.raises(MissingExtra, match=r"needs apache-tvm: pip install 'lpcompile\[tvm\]'"):
            parse("cuda:sm_89").tvm()
    finally:
        targets._aarch64_cpus.cache_clear()
        targets._parse.cache_clear()


@pytest.mark.skipif(not HAS_TVM, reason="needs apache-tvm")
def test_timing_unavailable_says_why():
    import tvm

    assert parse("llvm").timing_unavailable() is None
    assert "cross-compiled" in parse("aarch64").timing_unavailable()
    if not tvm.cuda(0).exist:
        assert parse("cuda:sm_90").timing_unavailable() == "there is no CUDA GPU on this machine"


@pytest.mark.skipif(not HAS_TVM, reason="needs apache-tvm")
def test_the_tvm_target_is_built_from_the_description():
    assert str(parse("cuda:sm_89").tvm().attrs["arch"]) == "sm_89"
    assert str(parse("aarch64:neoverse-v1").tvm().attrs["mcpu"]) == "neoverse-v1"
    assert parse("llvm").tvm().kind.name == "llvm"
