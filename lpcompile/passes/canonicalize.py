"""canonicalize: constant folding, clean-up, shape inference, and recognition of linear layers
and normalizations, so later passes rely on this and never on an exporter's quirks.

Preserves: exact semantics (the folded constants are computed by the same ops).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common

from lpcompile.ir import upgrade_opset
from lpcompile.ir.patterns import PATTERN_KEY, find_linear_layers, find_norms

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Canonicalize(ir.passes.InPlacePass):
    """Fold constants (weight transposes and casts included), drop dead nodes, infer shapes, and
    tag each linear layer (`lpcompile.pattern = linear:matmul|linear:gemm|linear:embedding`) and
    normalization (`norm:layernorm|norm:rmsnorm`) in node metadata."""

    fold_constants: bool = True
    shape_inference: bool = True
    # Folding must reach weight-sized tensors (a Transpose of a 4096x11008 weight).
    fold_size_limit: int = 1 << 28
    # Opset 21 is the first with int4 and blocked DequantizeLinear; upgrading here, before any
    # pass adds model-local functions, keeps those functions intact.
    min_opset: int = 21

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        stats: Counter[str] = Counter()
        modified = upgrade_opset(model, self.min_opset)
        modified |= common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=16)(model).modified
        if self.fold_constants:
            from onnxscript.optimizer import fold_constants

            before = model.graph.num_nodes()
            fold_constants(
                model, input_size_limit=self.fold_size_limit, output_size_limit=self.fold_size_limit
            )
            stats["folded"] = before - model.graph.num_nodes()
        for p in (common.RemoveUnusedNodesPass(), common.TopologicalSortPass()):
            modified |= p(model).modified
        modified |= stats["folded"] > 0
        if self.shape_inference:
            try:
                common.ShapeInferencePass(strict_mode=False)(model)
            except Exception as e:  # shape inference is a help, never a requirement
                log.debug("canonicalize: shape inference skipped: %s", e)
        for layer in find_linear_layers(model.graph):
            modified |= _tag(layer.node, f"linear:{layer.kind}")
            stats[f"linear:{layer.kind}"] += 1
        for norm in find_norms(model.graph):
            modified |= _tag(norm.nodes[-1], f"norm:{norm.kind}")
            stats[f"norm:{norm.kind}"] += 1
        log.info("canonicalize: %s", dict(stats))
        model.meta["lpcompile.canonicalize"] = dict(stats)
        return ir.passes.PassResult(model, modified=bool(modified))


def _tag(node: ir.Node, pattern: str) -> bool:
    if node.metadata_props.get(PATTERN_KEY) == pattern:
        return False
    node.metadata_props[PATTERN_KEY] = pattern
    return True
