"""The state one import shares between the converters: the values they remember (a quantized
weight as a `ConstantDequantize`, an activation carried quantized as a `QuantizedActivation`),
the 4-bit constants and inputs TVM cannot hold in their real type, the scheduled kernels (built
once per key; on CPUs compiled apart and called by name, `EXTERNAL_KERNEL`) and the
`LoweringReport`. `importer.from_onnx` makes one `_Context` per import and sets it active
(`_ACTIVE`); the converters read it from there, since TVM calls them as class methods."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, tirx

from lpcompile.backends.tvm import kernels as K
from lpcompile.backends.tvm.lower.report import LoweringReport

OPAQUE = 8  # relax OpPatternKind.kOpaque: never fuse other ops into a scheduled kernel
EXTERNAL_KERNEL = "lpcompile.external_kernel"  # a PrimFunc compiled apart from the relax module


@dataclass
class ConstantDequantize:
    """A `DequantizeLinear` of constants (a quantized weight as the ONNX model stores it): its
    inputs in numpy, the codes in their integer / fp8 form, and its attributes."""

    q: np.ndarray  # values as stored (int4/uint4 widened to int8/uint8), ONNX layout
    dtype: str  # "int4", "int8", "float8_e4m3fn", "float8_e5m2", ...
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int
    block_size: int | None


@dataclass
class QuantizedActivation:
    """An activation carried in its quantized form: q [m, k] plus how to scale it."""

    q: relax.Expr  # 2-D [m, k]
    dtype: str
    scale: relax.Expr  # [1] (tensor) or [m] (per token)
    zero_point: relax.Expr | None  # [1] for int8 tensor scales
    kind: str  # "tensor" or "row"
    shape: list  # the activation's original shape


class _Context:
    def __init__(self, target: tvm.target.Target, bb: relax.BlockBuilder):
        self.target = target
        self.bb = bb
        self.weights: dict[relax.Expr, ConstantDequantize] = {}
        self.acts: dict[relax.Expr, QuantizedActivation] = {}
        self.pending_q: dict[relax.Expr, tuple] = {}  # QuantizeLinear output -> (q [m, k], dtype, shape)
        # a DequantizeLinear of an activation with a scalar scale -> (its codes in the activation's
        # shape, their type, scale, zero point): what an activation x activation MatMul multiplies
        self.act_codes: dict[relax.Expr, tuple[relax.Expr, str, float, float]] = {}
        self.low_bit_consts: dict[relax.Expr, tuple[str, np.ndarray]] = {}
        self.low_bit_inputs: dict[relax.Expr, str] = {}  # 4-bit graph inputs, held one code per byte
        self.kernels: dict[tuple, relax.Expr] = {}
        # CPU kernels are compiled as a TIR module of their own and called by name (see
        # pipeline.build): inside a relax-built module TVM 0.27 turns their local buffers and
        # bindings into heap workspaces, and the register-blocked loops spill (3x slower)
        self.separate = target.kind.name == "llvm"
        self.external: dict[str, tirx.PrimFunc] = {}
        self.report = LoweringReport()
        # int64 tensors made from a symbolic shape for a consumer that computes on tensors (see
        # shapes.as_tensor), with that shape: a Reshape / Expand reading one gets the dims back
        self.shape_tensors: dict[relax.Expr, relax.ShapeExpr] = {}

    def kernel(self, key: tuple, make) -> relax.Expr:
        """A scheduled kernel (built once per key): a GlobalVar in the module, or for CPU targets
        the name of a separately compiled function."""
        if key not in self.kernels:
            name = "lp_" + "_".join(str(p) for p in key)
            func = K.schedule(make(), self.target)
            func = func.with_attrs({"tirx.is_scheduled": True, "op_pattern": OPAQUE, "global_symbol": name})
            if self.separate:
                self.external[name] = func.with_attr(EXTERNAL_KERNEL, True)
                self.kernels[key] = relax.ExternFunc(name)
            else:
                self.kernels[key] = self.bb.add_func(func, name)
        return self.kernels[key]

    def call(self, kernel: relax.Expr, args: list, out):
        """Call a kernel of `kernel()` in destination-passing style."""
        if isinstance(kernel, relax.ExternFunc):
            return relax.call_dps_packed(kernel, args, out)
        return relax.call_tir(kernel, args, out)


_ACTIVE: contextvars.ContextVar[_Context] = contextvars.ContextVar("lpcompile_lowering")
