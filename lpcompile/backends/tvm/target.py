"""TVM targets for lpcompile's target descriptions (`lpcompile.targets`): the host CPU (features
detected), 64-bit Arm Linux (cross-compiled and cross-linked) and CUDA sm_80..sm_90.

A spec is parsed and validated once, by `lpcompile.targets.parse`; this module only builds the
TVM target for a parsed `Target` (`resolve`) and describes a TVM target it is handed (`describe`:
what the kernel rules ask)."""

from __future__ import annotations

import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import sys

import tvm

from lpcompile import targets
from lpcompile.errors import TargetError
from lpcompile.targets import AARCH64_TRIPLE, CUDA_ARCHES, FP8, FP8_MIN_SM, KINDS as TARGET_KINDS, Target  # noqa: F401

CROSS_CC_ENV = "LPCOMPILE_CROSS_CC"


def resolve(spec: str | Target) -> tvm.target.Target:
    """The TVM target for a spec (parsed by `lpcompile.targets.parse`) or a parsed Target."""
    t = targets.parse(spec) if isinstance(spec, str) else spec
    if t.kind == "llvm":
        return host_target()
    if t.kind == "aarch64":
        return _aarch64(t.cpu)
    return _cuda(t.arch)


def aarch64_target(mcpu: str = "generic") -> tvm.target.Target:
    """64-bit Arm Linux with NEON; `mcpu` an LLVM CPU name (its features come with it)."""
    return _aarch64(targets.parse(f"aarch64:{mcpu}").cpu)


def _aarch64(mcpu: str) -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", "mtriple": AARCH64_TRIPLE, "mcpu": mcpu, "mattr": ["+neon"]})


def is_cross(target: tvm.target.Target) -> bool:
    """Whether an LLVM target's code cannot run on this machine."""
    triple = str(target.attrs.get("mtriple", "")) if target.kind.name == "llvm" else ""
    return bool(triple) and not triple.startswith(platform.machine())


def cross_linker(target: tvm.target.Target):
    """An `export_library` link function for a cross target: $LPCOMPILE_CROSS_CC (a command),
    else `<triple>-gcc` on PATH, else `zig cc` from the `ziglang` package (lpcompile[cross])."""
    triple = str(target.attrs["mtriple"])
    if os.environ.get(CROSS_CC_ENV):
        cmd = shlex.split(os.environ[CROSS_CC_ENV])
    elif shutil.which(f"{triple}-gcc"):
        cmd = [shutil.which(f"{triple}-gcc")]
    elif importlib.util.find_spec("ziglang") is not None:
        cmd = [sys.executable, "-m", "ziglang", "cc", "-target", triple]
    else:
        raise TargetError(f"linking for {triple} needs a cross linker: pip install ziglang (lpcompile[cross]), "
                          f"put {triple}-gcc on PATH, or set {CROSS_CC_ENV}")

    def link(output, objects, options=None, cc=None, cwd=None, ccache_env=None):
        r = subprocess.run([*cmd, "-shared", "-fPIC", "-o", output, *objects], capture_output=True, text=True)
        if r.returncode != 0:
            raise TargetError(f"cross link for {triple} failed ({' '.join(cmd[:4])}): {r.stderr.strip()[-300:]}")

    link.output_format = "so"
    return link


def host_target(num_cores: int | None = None) -> tvm.target.Target:
    """The host CPU as an LLVM target with its real feature set.

    `mcpu: native` silently falls back to generic x86 (no AVX) in TVM 0.27, so the CPU name is
    asked from LLVM instead.
    """
    cores = num_cores or len(os.sched_getaffinity(0))
    return tvm.target.Target(
        {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": cores}
    )


def cuda_target(arch: str = "sm_80") -> tvm.target.Target:
    """A CUDA target for one of CUDA_ARCHES (others refused as `targets.parse` refuses them)."""
    return _cuda(targets.cuda(arch).arch)


def _cuda(arch: str) -> tvm.target.Target:
    # Its host code (the Relax VM's glue) is built for a generic CPU of this architecture, not
    # this machine's: a GPU server's CPU is rarely the build machine's, and code for this CPU's
    # extensions would fault there.
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host=tvm.target.Target({"kind": "llvm"}))


def describe(target: tvm.target.Target) -> Target:
    """The description (`lpcompile.targets.Target`) of a TVM target the backend is handed: what
    its kernel rules ask. CPU features are LLVM's for the target's CPU (what code for it may
    use); a CUDA target's arch must be one of CUDA_ARCHES."""
    key = str(target)  # its JSON
    if key not in _DESCRIBED:
        _DESCRIBED[key] = _describe(target)
    return _DESCRIBED[key]


_DESCRIBED: dict[str, Target] = {}


def _describe(target: tvm.target.Target) -> Target:
    if target.kind.name == "cuda":
        arch = str(target.attrs.get("arch", ""))
        if not arch.startswith("sm_"):
            raise TargetError(f"CUDA target without an sm_ arch: {target}")
        return targets.cuda(arch)
    if target.kind.name != "llvm":
        raise TargetError(f"no kernels for TVM target kind {target.kind.name!r}")
    features = frozenset(name for name, llvm in targets.CPU_FEATURES.items()
                         if tvm.target.codegen.target_has_features(llvm, target))
    mcpu = str(target.attrs.get("mcpu", "")) or None
    if str(target.attrs.get("mtriple", "")).startswith("aarch64"):
        return targets.cpu_target(f"aarch64:{mcpu or targets.DEFAULT_AARCH64_CPU}", mcpu, features | {"neon"})
    return targets.cpu_target("llvm", mcpu, features)


def cuda_sm(target: tvm.target.Target) -> int:
    """The SM version (80, 86, ...) of a CUDA target."""
    sm = describe(target).sm
    if sm is None:
        raise TargetError(f"not a CUDA target: {target}")
    return sm


def supports_fp8(target: tvm.target.Target) -> bool:
    """FP8 kernels run on CPUs (converted in software) and on CUDA sm_89+."""
    return not (FP8 & describe(target).unavailable_formats)
