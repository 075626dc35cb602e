"""lpcompile's passes: each an `onnx_ir.passes` pass, usable in any onnx_ir pass manager."""

from lpcompile.passes.calibrate import Calibrate, Calibration, TensorStats
from lpcompile.passes.canonicalize import Canonicalize
from lpcompile.passes.cleanup import Cleanup
from lpcompile.passes.quantize import LayerPlan, Quantize
from lpcompile.passes.rotate import Rotate

__all__ = ["Calibrate", "Calibration", "Canonicalize", "Cleanup", "LayerPlan", "Quantize", "Rotate", "TensorStats"]
