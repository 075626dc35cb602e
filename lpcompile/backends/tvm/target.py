"""TVM targets lpcompile compiles for: the host CPU (features detected) and CUDA sm_80..sm_90."""

from __future__ import annotations

import os

import tvm

from lpcompile.errors import TargetError

CUDA_ARCHES = ("sm_80", "sm_86", "sm_89", "sm_90")
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
    """A CUDA target for one of CUDA_ARCHES, with the host CPU as its host."""
    if arch not in CUDA_ARCHES:
        raise TargetError(f"unsupported CUDA arch {arch!r}; supported: {', '.join(CUDA_ARCHES)}")
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host=host_target())


def cuda_sm(target: tvm.target.Target) -> int:
    """The SM version (80, 86, ...) of a CUDA target."""
    arch = str(target.attrs.get("arch", ""))
    if not arch.startswith("sm_"):
        raise TargetError(f"CUDA target without an sm_ arch: {target}")
    return int(arch[3:].rstrip("a"))


def supports_fp8(target: tvm.target.Target) -> bool:
    """FP8 kernels run on CPUs (converted in software) and on CUDA sm_89+."""
    return target.kind.name != "cuda" or cuda_sm(target) >= FP8_MIN_SM
