"""What lpcompile compiles for: a target spec parsed once, before any work, into one description.

    t = parse("cuda:sm_80")      # TargetError (one line) for every spec it refuses
    t.spec                       # "cuda:sm_80" (normalised: defaults spelled out)
    t.unavailable_formats        # {"fp8_e4m3", "fp8_e5m2"}: FP8 kernels need sm_89+
    t.check_formats(["fp8_e4m3"], "fp8")   # TargetError before capture, whatever is emitted
    t.timing_unavailable()       # "there is no CUDA GPU on this machine" (None where kernels can be timed)
    t.tvm()                      # the tvm.target.Target (imports TVM; backends/tvm/target.py builds it)

Specs:
  llvm            this machine's CPU; its features detected (/proc/cpuinfo). `llvm:CPU` is refused:
                  code tuned for another x86 CPU than the one it is built and timed on is not offered
                  (cross-compile for Arm with aarch64[:CPU]).
  aarch64[:CPU]   64-bit Arm Linux, cross-compiled; CPU an LLVM CPU name (default generic ARMv8-A +
                  NEON). Checking a CPU name asks LLVM (through TVM) for its list.
  cuda[:sm_XX]    an NVIDIA GPU of one of CUDA_ARCHES (default sm_80). sm_90a is refused: the code
                  is built for sm_90, which runs on sm_90a GPUs (no sm_90a-only instruction is used).

Parsing needs no TVM except to check an aarch64 CPU name; the description is what the compiler
decides with (formats select may choose, formats refused, whether latency can be measured) and
what the backend's kernel rules (backends/tvm/kernels/rules.py) ask (`features`, `sm`).
"""

from __future__ import annotations

import functools
import platform
import re
from collections.abc import Iterable
from dataclasses import dataclass

from lpcompile import extras
from lpcompile.errors import TargetError
from lpcompile.runtime.cpu import CPUINFO_FLAGS, host_flags

KINDS = ("llvm", "aarch64", "cuda")
CUDA_ARCHES = ("sm_80", "sm_86", "sm_89", "sm_90")
DEFAULT_CUDA_ARCH = "sm_80"
DEFAULT_AARCH64_CPU = "generic"
AARCH64_TRIPLE = "aarch64-linux-gnu"
INT8_MMA_MIN_SM = 80  # mma.sync m16n8k32 on 8-bit integers
FP8_MIN_SM = 89  # FP8 (E4M3, E5M2) tensor-core mma and cvt: Ada / Hopper
FP8 = frozenset({"fp8_e4m3", "fp8_e5m2"})
# Formats some kernel takes natively on every target (int4: weights, and per-token activations
# carried in int8; int8 / uint8: weights and activations)
INTEGER_FORMATS = frozenset({"int4", "int8", "uint8"})
# CPU flags (as /proc/cpuinfo and lscpu name them) that decide a kernel or are worth naming
# (AMX: no kernel uses it yet), with LLVM's name for each (runtime.cpu's table: one translation)
CPU_FEATURES = {CPUINFO_FLAGS["x86_64"][llvm]: llvm
                for llvm in ("avx2", "avx512f", "avx512vnni", "avxvnni", "amx-tile", "amx-int8")}
USAGE = f"choose one of: llvm, aarch64[:CPU], cuda[:{'|'.join(CUDA_ARCHES)}]"
# The CLI's --target help
HELP = (f"llvm = this CPU (its features detected; no CPU name) | aarch64[:CPU] = 64-bit Arm Linux, "
        f"cross-compiled (an LLVM CPU name, e.g. neoverse-v1; default generic) | cuda[:{'|'.join(CUDA_ARCHES)}] "
        f"(default {DEFAULT_CUDA_ARCH}; FP8 needs sm_{FP8_MIN_SM}+). Checked before any work, whatever --emit says")


@dataclass(frozen=True)
class Target:
    """One target, parsed (see the module docstring).

    `features`: instruction-set features the kernel rules ask about: for CPUs the flags of
    CPU_FEATURES it has (this machine's, detected; a Target made from a TVM target asks LLVM about
    its CPU), "neon" on aarch64; for CUDA "mma_int8" (sm_80+) and "mma_fp8" (sm_89+).
    `native_formats`: formats (lpcompile.formats names) some kernel takes as they are;
    `emulated_formats`: formats that run only dequantized to float in the kernel (FP8 on CPUs:
    no FP8 arithmetic there); `unavailable_formats`: formats refused on this target (FP8 below
    sm_89)."""

    spec: str
    kind: str
    arch: str | None = None  # cuda: "sm_89"
    cpu: str | None = None  # aarch64: the LLVM CPU name; llvm: None (this machine's CPU)
    features: frozenset[str] = frozenset()
    native_formats: frozenset[str] = INTEGER_FORMATS
    emulated_formats: frozenset[str] = frozenset()
    unavailable_formats: frozenset[str] = frozenset()

    def __str__(self) -> str:
        return self.spec

    @property
    def sm(self) -> int | None:
        """The SM version of a CUDA target (80, 86, 89, 90); None for CPUs."""
        return int(self.arch[3:]) if self.arch else None

    @property
    def is_cpu(self) -> bool:
        return self.kind in ("llvm", "aarch64")

    def has(self, feature: str) -> bool:
        return feature in self.features

    def instructions(self) -> list[str]:
        """What the kernels use natively here, in words (for reports)."""
        names = {"avx512f": "AVX-512 (int4 GEMV table decode)", "avx512_vnni": "AVX-512 VNNI (dot4 int8 kernels)",
                 "avx_vnni": "AVX-VNNI", "amx_int8": "AMX-INT8 (no kernel uses it yet)", "neon": "NEON",
                 "mma_int8": "int8 tensor-core mma", "mma_fp8": "FP8 tensor-core mma"}
        return [names[f] for f in sorted(self.features) if f in names]

    def check_formats(self, names: Iterable[str], what: str) -> None:
        """Refuse (one line) a request for formats this target cannot run; `what` names the request
        (a recipe name, "plan")."""
        refused = sorted(set(names) & self.unavailable_formats)
        if not refused:
            return
        if set(refused) <= FP8:
            raise TargetError(f"format {what!r} needs FP8 kernels: CUDA sm_{FP8_MIN_SM}+ (target {self.spec}); "
                              f"use --target cuda:sm_89 or cuda:sm_90")
        raise TargetError(f"format {what!r} uses {', '.join(refused)}, which target {self.spec} cannot run")

    def select_options(self) -> dict:
        """The select pass's arguments for this target: formats flagged as emulated, and whether
        they may be chosen at all (not where they are unavailable)."""
        if self.unavailable_formats:
            return {"emulated": self.emulated_formats | self.unavailable_formats, "allow_emulated": False}
        return {"emulated": self.emulated_formats}

    def timing_unavailable(self) -> str | None:
        """Why kernels for this target cannot be timed on this machine; None when they can."""
        if (reason := extras.missing_reason("tvm")) is not None:
            return reason
        if self.kind == "aarch64":
            return None if _machine_is_aarch64() else f"{AARCH64_TRIPLE} code does not run on this machine (cross-compiled)"
        if self.kind == "cuda":
            import tvm

            dev = tvm.cuda(0)
            if not dev.exist:
                return "there is no CUDA GPU on this machine"
            try:
                here = int(str(dev.compute_version).replace(".", ""))
            except (TypeError, ValueError):  # a runtime that cannot say: the build will
                return None
            if here < self.sm:
                return f"the GPU here is sm_{here}, older than the target's sm_{self.sm}"
        return None

    def tvm(self):
        """The tvm.target.Target for this target (TVM imported here)."""
        if not extras.installed("tvm"):
            raise extras.MissingExtra(f"compiling for {self.spec} needs {extras.install_hint('tvm')} "
                                      "(--emit onnx needs no TVM)")
        from lpcompile.backends.tvm.target import resolve

        return resolve(self)


def parse(spec: str) -> Target:
    """The Target a spec names; TargetError with a one-line reason for every spec refused."""
    if not isinstance(spec, str):
        raise TargetError(f"a target is a string ({USAGE}), got {type(spec).__name__}")
    return _parse(spec.strip().lower())


@functools.lru_cache(maxsize=64)
def _parse(spec: str) -> Target:
    kind, colon, arg = spec.partition(":")
    if not spec:
        raise TargetError(f"empty target; {USAGE}")
    if kind not in KINDS:
        raise TargetError(f"unknown target {spec!r}; {USAGE}")
    if colon and not arg:
        raise TargetError(f"target {spec!r} names nothing after ':'; {USAGE}")
    if kind == "llvm":
        if arg:
            raise TargetError(f"target {spec!r}: llvm compiles for this machine's CPU (features detected) and takes "
                              "no CPU name; cross-compile for Arm with aarch64[:CPU]")
        return cpu_target("llvm", None, host_features())
    if kind == "aarch64":
        cpu = arg or DEFAULT_AARCH64_CPU
        if cpu != DEFAULT_AARCH64_CPU:
            _check_aarch64_cpu(cpu)
        return cpu_target(f"aarch64:{cpu}", cpu, frozenset({"neon"}))
    return cuda(arg or DEFAULT_CUDA_ARCH)


def cpu_target(spec: str, cpu: str | None, features: frozenset[str]) -> Target:
    """A CPU target: integer kernels native, FP8 dequantized in the kernel (emulated)."""
    return Target(spec, spec.partition(":")[0], cpu=cpu, features=frozenset(features),
                  native_formats=INTEGER_FORMATS, emulated_formats=FP8)


def cuda(arch: str) -> Target:
    """A CUDA target of one of CUDA_ARCHES (TargetError, one line, for any other arch)."""
    if arch not in CUDA_ARCHES:
        m = re.fullmatch(r"sm_(\d+)(a?)", arch)
        if m is None:
            raise TargetError(f"unknown CUDA arch {arch!r}: expected sm_XX, one of {', '.join(CUDA_ARCHES)}")
        base = f"sm_{m[1]}"
        why = (f"lpcompile builds {base} code, which runs on {arch} GPUs: use cuda:{base}"
               if m[2] and base in CUDA_ARCHES
               else f"the kernels need sm_{INT8_MMA_MIN_SM}+" if int(m[1]) < INT8_MMA_MIN_SM
               else "not a GPU lpcompile builds for")
        raise TargetError(f"unsupported CUDA arch {arch!r} ({why}); choose one of {', '.join(CUDA_ARCHES)}")
    sm = int(arch[3:])
    fp8 = sm >= FP8_MIN_SM
    return Target(f"cuda:{arch}", "cuda", arch=arch,
                  features=frozenset({"mma_int8", *(["mma_fp8"] if fp8 else [])}),
                  native_formats=INTEGER_FORMATS | (FP8 if fp8 else frozenset()),
                  unavailable_formats=frozenset() if fp8 else FP8)


def host_features() -> frozenset[str]:
    """This machine's CPU flags of CPU_FEATURES, from /proc/cpuinfo (`runtime.cpu.host_flags`;
    empty where there is none)."""
    return frozenset(CPU_FEATURES) & (host_flags() or frozenset())


def _machine_is_aarch64() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


@functools.lru_cache(maxsize=None)
def _aarch64_cpus() -> frozenset[str]:
    if not extras.installed("tvm"):
        raise extras.MissingExtra(f"checking an aarch64 CPU name asks LLVM, which needs {extras.install_hint('tvm')}")
    import tvm

    return frozenset(str(c) for c in tvm.target.codegen.llvm_get_cpu_archlist(
        tvm.target.Target({"kind": "llvm", "mtriple": AARCH64_TRIPLE})))


def _check_aarch64_cpu(cpu: str) -> None:
    if cpu not in _aarch64_cpus():
        raise TargetError(f"unknown aarch64 CPU {cpu!r} (an LLVM CPU name, e.g. generic, cortex-a76, neoverse-v1)")
