"""Lower a QDQ ONNX model (lpcompile's quantize conventions, opset 21) to a Relax module whose
quantized linear layers call lpcompile's low-bit kernels.

TVM's ONNX importer (`tvm.relax.frontend.onnx`) is extended, not edited: `importer.QdqImporter`
subclasses its graph importer and puts our converter classes (subclasses of its
`OnnxOpConverter`s) in front of its converter table. The patterns are matched while importing,
in dataflow order:

    DequantizeLinear(constant w_q, constant scale)    -> remembered as a quantized weight
    QuantizeLinear(x, scalar scale, scalar zp)        -> quantize kernel, remembered as a
    DequantizeLinear(that q)                             quantized activation
    ai.lpcompile::PerTokenQDQ_int8(x)                 -> per-token quantize kernel, remembered
    MatMul(a, weight) / Gemm(a, weight[, bias])       -> one call_tir to `quantized_matmul` with
                                                         the weight repacked at compile time;
                                                         a quantized `a` whose (activation,
                                                         weight) pair has a kernel is consumed
                                                         in its integer/fp8 form

Every remembered value also has an exact float fallback (the dequantized value), so a DQ or a
quantized activation whose consumer is anything else still computes what ONNX says; fallbacks
nobody uses are removed by dead-code elimination. `LoweringReport` counts what fired and why
a match was refused.

One idea per module, layered bottom-up (each imports only those above it):

    report       LoweringReport: what fired, what was refused and why, per-layer records
    context      the per-import state: remembered weights / activations, kernel cache, report
    exprs        reading Relax values: constants, shapes, static dims, rows, node names
    qdq          DequantizeLinear / QuantizeLinear / PerTokenQDQ_*, float fallbacks, fp8 decode
    linear       MatMul / Gemm on the quantized_matmul kernels; kernel_choice
    gather       Gather from a low-bit embedding table
    hadamard     the online Hadamard transform (fast Walsh–Hadamard kernel or dense factors)
    shapes       shape values (symbolic scalars, ShapeExprs, shapes computed as tensors) and
                 the conversions between them, for exporters' shape arithmetic
    workarounds  Expand / Reshape / Range where TVM 0.27's stock converters fail
    importer     QdqImporter, CONVERTERS (registers the converters above), from_onnx, compile_model
"""

from lpcompile.backends.tvm.lower.context import EXTERNAL_KERNEL, OPAQUE, ConstantDequantize, QuantizedActivation
from lpcompile.backends.tvm.lower.importer import CONVERTERS, QdqImporter, compile_model, from_onnx
from lpcompile.backends.tvm.lower.linear import kernel_choice
from lpcompile.backends.tvm.lower.report import LoweringReport

__all__ = [
    "CONVERTERS",
    "EXTERNAL_KERNEL",
    "OPAQUE",
    "ConstantDequantize",
    "LoweringReport",
    "QdqImporter",
    "QuantizedActivation",
    "compile_model",
    "from_onnx",
    "kernel_choice",
]
