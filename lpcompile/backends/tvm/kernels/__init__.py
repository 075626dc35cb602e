"""lpcompile's low-precision kernels for TVM: compute definitions, schedules, builds.

    func = quantized_matmul(None, 4096, 4096, weight="int4", block_size=128)  # m symbolic
    ex = build(func, host_target())            # scheduled for the target, compiled
    ex["main"](x, INT4.pack(q, 4096), scales, y)

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
    PAIRS,
    code_storage,
    dequantize_linear,
    hadamard_transform,
    quantize_linear,
    quantize_rows,
    quantize_tensor,
    quantized_matmul,
)
from lpcompile.backends.tvm.kernels.packing import BLOCK, DOT4, INT4, NIB8, Int4Layout, blocked_scales, onnx_weight_to_kn
from lpcompile.backends.tvm.kernels.rules import MatmulSpec, choose
from lpcompile.backends.tvm.target import FP8_MIN_SM, supports_fp8
from lpcompile.errors import TargetError

__all__ = [
    "BLOCK",
    "DOT4",
    "FLOAT8",
    "INT4",
    "NIB8",
    "KERNEL_ATTR",
    "PAIRS",
    "CUDA_PRECISE_MATH",
    "Int4Layout",
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
# quantization rounding away from the CPU/ONNX reference. lpcompile compiles without it
# (TVM_CUDA_NVCC_NO_FAST_MATH), precise division, square root and denormals spelled out too.
CUDA_PRECISE_MATH = ["-prec-div=true", "-prec-sqrt=true", "-ftz=false"]


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
    """CUDA source -> cubin / fatbin / ptx for the target's arch, with nvcc and precise math."""
    import os

    from tvm.support import nvcc

    saved = os.environ.get("TVM_CUDA_NVCC_NO_FAST_MATH")
    os.environ["TVM_CUDA_NVCC_NO_FAST_MATH"] = "1"
    try:
        with target:
            return bytes(nvcc.compile_cuda(source, target_format=fmt, arch=str(target.attrs["arch"]),
                                           options=CUDA_PRECISE_MATH, compiler="nvcc"))
    finally:
        if saved is None:
            del os.environ["TVM_CUDA_NVCC_NO_FAST_MATH"]
        else:
            os.environ["TVM_CUDA_NVCC_NO_FAST_MATH"] = saved


def cuda_binary(ex: tvm.runtime.Executable, target: tvm.target.Target, fmt: str = "cubin") -> bytes:
    """Compile the CUDA source of a `build` for `target` with nvcc (precise math)."""
    return nvcc_compile(ex.mod.imports[0].inspect_source(), target, fmt)
