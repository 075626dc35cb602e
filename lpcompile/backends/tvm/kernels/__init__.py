"""lpcompile's low-precision kernels for TVM: compute definitions, schedules, builds.

    func = quantized_matmul(None, 4096, 4096, weight="int4", block_size=128)  # m symbolic
    ex = build(func, host_target())            # scheduled for the target, compiled
    ex["main"](x, NIBBLE.pack(q, 4096), scales, y)

One compute definition per kernel (`compute`) feeds every target; `schedule` picks the target's
schedule from a table keyed by the target kind (`cpu` for llvm, `cuda`); a matmul's kernel (and
its weight layout) is the first rule of the target's ordered list that applies (`rules`).
"""

from __future__ import annotations

from collections.abc import Mapping

import tvm
from tvm import tirx

from lpcompile.backends.tvm.kernels import cpu, cuda
from lpcompile.backends.tvm.kernels.compute import (
    FLOAT8,
    KERNEL_ATTR,
    KERNEL_FORMATS,
    PAIRS,
    code_storage,
    dequantize_linear,
    hadamard_transform,
    quantize_linear,
    quantize_rows,
    quantize_tensor,
    quantized_matmul,
)
from lpcompile.backends.tvm.kernels.packing import BLOCK, DOT4, NIB8, NIBBLE, NibbleLayout, blocked_scales, onnx_weight_to_kn
from lpcompile.backends.tvm.kernels.rules import MatmulSpec, choose
from lpcompile.backends.tvm.target import FP8_MIN_SM, supports_fp8
from lpcompile.errors import BackendError, TargetError

__all__ = [
    "BLOCK",
    "DOT4",
    "FLOAT8",
    "NIB8",
    "NIBBLE",
    "KERNEL_ATTR",
    "KERNEL_FORMATS",
    "PAIRS",
    "CUDA_PRECISE_MATH",
    "NibbleLayout",
    "blocked_scales",
    "build",
    "code_storage",
    "dequantize_linear",
    "quantize_linear",
    "cuda_binary",
    "nvcc_compile",
    "hadamard_transform",
    "onnx_weight_to_kn",
    "quantize_rows",
    "quantize_tensor",
    "quantized_matmul",
    "schedule",
    "MatmulSpec",
    "choose",
]

SCHEDULERS = {"llvm": cpu.schedule, "cuda": cuda.schedule}

# TVM hands nvcc --use_fast_math, which turns powf into __powf (NaN for a negative base: measured
# on an H200, LLaMA's RMSNorm x^2 came out NaN) and expf/logf/division into approximations that move
# quantization rounding away from the CPU/ONNX reference. lpcompile runs nvcc itself (`nvcc_compile`)
# with TVM's other flags and without it, precise division, square root and denormals spelled out too.
# (TVM's own switch is the process-wide TVM_CUDA_NVCC_NO_FAST_MATH environment variable, which a
# compiler used from several threads must not toggle.)
CUDA_PRECISE_MATH = ["-prec-div=true", "-prec-sqrt=true", "-ftz=false"]
# What tvm.support.nvcc (0.27) passes besides --use_fast_math: half/bfloat16 operators enabled in
# cuda_fp16.h / cuda_bf16.h, and its ptxas register-usage level.
NVCC_FLAGS = ["-O3", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
              "--expt-relaxed-constexpr", "--expt-extended-lambda",
              "--ptxas-options=--register-usage-level=10,--warn-on-local-memory-usage"]
NVCC_FORMATS = ("cubin", "fatbin", "ptx")


def schedule(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    """The kernel scheduled for `target` (its kind selects the schedule table)."""
    scheduler = SCHEDULERS.get(target.kind.name)
    if scheduler is None:
        raise TargetError(f"no kernel schedules for target kind {target.kind.name!r}")
    return scheduler(func, target)


def build(funcs: tirx.PrimFunc | Mapping[str, tirx.PrimFunc], target: tvm.target.Target) -> tvm.runtime.Executable:
    """Schedule and compile one kernel (as "main") or several named kernels into one module."""
    if isinstance(funcs, tirx.PrimFunc):
        funcs = {"main": funcs}
    if not supports_fp8(target):
        for name, f in funcs.items():
            if any(str(p.dtype).startswith("float8") for p in f.params):
                raise TargetError(f"{name}: FP8 kernels need CUDA sm_{FP8_MIN_SM}+ (target {target.attrs['arch']})")
    mod = tvm.IRModule({name: schedule(f, target).with_attr("global_symbol", name) for name, f in funcs.items()})
    return tvm.compile(mod, target=target)


def nvcc_compile(source: str, target: tvm.target.Target, fmt: str = "fatbin") -> bytes:
    """CUDA source -> cubin / fatbin / ptx for the target's arch, with nvcc (the one on PATH) and
    precise math. Nothing process-wide changes: safe to call from several threads."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    if fmt not in NVCC_FORMATS:
        raise TargetError(f"nvcc output must be one of {', '.join(NVCC_FORMATS)}, got {fmt!r}")
    if target.kind.name != "cuda":
        raise TargetError(f"nvcc compiles for CUDA targets, not {target.kind.name}")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise TargetError("CUDA targets are compiled with nvcc, which is not on PATH")
    with tempfile.TemporaryDirectory(prefix="lpcompile-nvcc-") as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / f"kernels.{fmt}"
        src.write_text(source)
        cmd = [nvcc, f"--{fmt}", "-arch", str(target.attrs["arch"]), *NVCC_FLAGS, *CUDA_PRECISE_MATH,
               "-o", str(out), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not out.is_file() or out.stat().st_size == 0:
            raise BackendError(f"nvcc failed ({proc.returncode}) on the generated CUDA source: "
                               f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
        return out.read_bytes()


def cuda_binary(ex: tvm.runtime.Executable, target: tvm.target.Target, fmt: str = "cubin") -> bytes:
    """Compile the CUDA source of a `build` for `target` with nvcc (precise math)."""
    return nvcc_compile(ex.mod.imports[0].inspect_source(), target, fmt)
