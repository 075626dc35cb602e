"""cleanup: dead nodes and functions, duplicate initializers, a consistent IR version.

Preserves: exact semantics.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common

# int4/uint4 and float8 tensors need IR version 9+, float4 needs 11; 10 is what opset 21 pairs with.
MIN_IR_VERSION = 10


@dataclass(frozen=True)
class Cleanup(ir.passes.InPlacePass):
    """Remove what nothing uses and raise the IR version to what the tensor types need."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for p in (
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.DeduplicateInitializersPass(),
            common.TopologicalSortPass(),
        ):
            modified |= p(model).modified
        needed = MIN_IR_VERSION
        if any(v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT4E2M1
               for v in model.graph.initializers.values()):
            needed = 11
        if model.ir_version < needed:
            model.ir_version = needed
            modified = True
        return ir.passes.PassResult(model, modified=modified)
