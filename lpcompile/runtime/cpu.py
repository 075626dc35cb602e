"""Which CPU features a compiled library may use, and whether this CPU has them.

The manifest records the instruction-set extensions the LLVM target enabled (LLVM's feature names,
e.g. avx512vnni, amx-int8, dotprod); loading refuses a library whose features this CPU lacks with
a line naming them, instead of dying of an illegal instruction. Only the extensions below are
recorded and checked: LLVM's other "features" are tuning hints, and these are the ones Linux
reports in /proc/cpuinfo (under the names given here). Elsewhere nothing is checked.

No dependencies: the compiler's exporter imports the table, the runtime checks against it.
"""

from __future__ import annotations

import platform
from functools import lru_cache

# LLVM feature name -> the flag /proc/cpuinfo lists for it, per machine (platform.machine())
CPUINFO_FLAGS: dict[str, dict[str, str]] = {
    "x86_64": {
        "sse": "sse", "sse2": "sse2", "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2",
        "popcnt": "popcnt", "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi": "bmi1",
        "bmi2": "bmi2", "lzcnt": "abm", "movbe": "movbe", "aes": "aes", "pclmul": "pclmulqdq", "sha": "sha_ni",
        "adx": "adx", "gfni": "gfni", "vaes": "vaes", "vpclmulqdq": "vpclmulqdq",
        "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl",
        "avx512cd": "avx512cd", "avx512ifma": "avx512ifma", "avx512vbmi": "avx512vbmi",
        "avx512vbmi2": "avx512_vbmi2", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16",
        "avx512fp16": "avx512_fp16", "avx512bitalg": "avx512_bitalg", "avx512vpopcntdq": "avx512_vpopcntdq",
        "avx512vp2intersect": "avx512_vp2intersect", "avxvnni": "avx_vnni",
        "amx-tile": "amx_tile", "amx-int8": "amx_int8", "amx-bf16": "amx_bf16", "amx-fp16": "amx_fp16",
    },
    "aarch64": {
        "fp-armv8": "fp", "neon": "asimd", "crc": "crc32", "aes": "aes", "sha2": "sha2", "lse": "atomics",
        "rdm": "asimdrdm", "fullfp16": "asimdhp", "dotprod": "asimddp", "fp16fml": "asimdfhm", "i8mm": "i8mm",
        "bf16": "bf16", "sve": "sve", "sve2": "sve2", "sme": "sme",
    },
}


def library_features(machine: str, llvm_features) -> list[str]:
    """The recorded features of a library: the checkable extensions among an LLVM target's."""
    table = CPUINFO_FLAGS.get(machine, {})
    return sorted(f for f in map(str, llvm_features) if f in table)


@lru_cache(maxsize=1)
def cpu_name() -> str:
    """This CPU's model name from /proc/cpuinfo (what benchmarks record beside their numbers)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_flags() -> frozenset[str] | None:
    """This CPU's feature flags from /proc/cpuinfo (None where there is none to read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return None


def missing_features(machine: str, features: list[str], flags: frozenset[str] | None = None) -> list[str]:
    """The recorded `features` (LLVM names) this CPU lacks; [] where that cannot be told."""
    flags = host_flags() if flags is None else flags
    table = CPUINFO_FLAGS.get(machine)
    if flags is None or table is None or machine != platform.machine():
        return []
    return [f for f in features if f in table and table[f] not in flags]
