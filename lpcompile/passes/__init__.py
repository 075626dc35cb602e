"""lpcompile's passes: each an `onnx_ir.passes` pass, usable in any onnx_ir pass manager."""

from lpcompile.passes.calibrate import Calibrate, Calibration, TensorStats
from lpcompile.passes.canonicalize import Canonicalize
from lpcompile.passes.cleanup import Cleanup
from lpcompile.passes.quantize import Quantize, UniformPlan
from lpcompile.passes.rotate import Rotate
from lpcompile.passes.select import Select
from lpcompile.plan import LayerChoice, Plan

__all__ = ["Calibrate", "Calibration", "Canonicalize", "Cleanup", "LayerChoice", "Plan", "Quantize", "Rotate",
           "Select", "TensorStats", "UniformPlan"]
