"""TVM targets lpcompile compiles for: the host CPU (features detected), 64-bit Arm Linux
(cross-compiled and cross-linked) and CUDA sm_80..sm_90.

A target is named by a short spec: `llvm` (this CPU), `aarch64` or `aarch64:CPU` (e.g.
`aarch64:neoverse-v1`; default a generic ARMv8-A with NEON), `cuda` or `cuda:sm_89`."""

from __future__ import annotations

import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import sys

import tvm

from lpcompile.errors import TargetError

CUDA_ARCHES = ("sm_80", "sm_86", "sm_89", "sm_90")
TARGET_KINDS = ("llvm", "aarch64", "cuda")
AARCH64_TRIPLE = "aarch64-linux-gnu"
CROSS_CC_ENV = "LPCOMPILE_CROSS_CC"


def resolve(spec: str) -> tvm.target.Target:
    """The TVM target a spec names (see the module docstring)."""
    kind, _, arg = spec.partition(":")
    if kind == "llvm" and not arg:
        return host_target()
    if kind == "aarch64":
        return aarch64_target(arg or "generic")
    if kind == "cuda":
        return cuda_target(arg or "sm_80")
    raise TargetError(f"unknown target {spec!r}; choose one of: llvm, aarch64[:CPU], cuda[:{'|'.join(CUDA_ARCHES)}]")


def aarch64_target(mcpu: str = "generic") -> tvm.target.Target:
    """64-bit Arm Linux with NEON; `mcpu` an LLVM CPU name (its features come with it)."""
    if mcpu not in tvm.target.codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm", "mtriple": AARCH64_TRIPLE})):
        raise TargetError(f"unknown aarch64 CPU {mcpu!r} (an LLVM CPU name, e.g. generic, cortex-a76, neoverse-v1)")
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
FP8_MIN_SM = 89


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
    """A CUDA target for one of CUDA_ARCHES. Its host code (the Relax VM's glue) is built for a
    generic CPU of this architecture, not this machine's: a GPU server's CPU is rarely the build
    machine's, and code for this CPU's extensions would fault there."""
    if arch not in CUDA_ARCHES:
        raise TargetError(f"unsupported CUDA arch {arch!r}; supported: {', '.join(CUDA_ARCHES)}")
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host=tvm.target.Target({"kind": "llvm"}))


def cuda_sm(target: tvm.target.Target) -> int:
    """The SM version (80, 86, ...) of a CUDA target."""
    arch = str(target.attrs.get("arch", ""))
    if not arch.startswith("sm_"):
        raise TargetError(f"CUDA target without an sm_ arch: {target}")
    return int(arch[3:].rstrip("a"))


def supports_fp8(target: tvm.target.Target) -> bool:
    """FP8 kernels run on CPUs (converted in software) and on CUDA sm_89+."""
    return target.kind.name != "cuda" or cuda_sm(target) >= FP8_MIN_SM
