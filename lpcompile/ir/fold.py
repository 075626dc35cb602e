"""Weights computed from constants, materialized: for backends that match constant weights.

A sparsified layer's weight (`lpcompile.passes.sparsify`) is computed at run time from its
compressed form (values + indices or a bitmask, through an `ai.lpcompile` expansion function).
A backend without a kernel reading that form gets the expanded weight instead: `fold_weights`
evaluates, in onnxruntime, every weight input of a linear op (MatMul / Gemm B / Conv W, or the
codes a DequantizeLinear there reads) that depends on constants only, and stores the result as
an initializer, so the layer is the dense layer of the same format.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1}


def computed_weights(graph: ir.Graph) -> list[ir.Value]:
    """Weight inputs of linear ops (or of the DequantizeLinear feeding one) that a node computes
    from initializers alone."""
    out, seen = [], set()
    for node in graph:
        index = _WEIGHT_INPUT.get(node.op_type)
        if index is None or node.domain not in ("", "ai.onnx") or len(node.inputs) <= index:
            continue
        value = node.inputs[index]
        producer = value.producer() if value is not None else None
        if producer is not None and producer.op_type == "DequantizeLinear":
            value = producer.inputs[0]
        if value is None or value.const_value is not None or value.producer() is None or id(value) in seen:
            continue
        if _constant_only(value):
            seen.add(id(value))
            out.append(value)
    return out


def _constant_only(value: ir.Value) -> bool:
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if v.const_value is not None:
            continue
        if v.is_graph_input():
            return False
        producer = v.producer()
        if producer is None:
            return False
        stack.extend(producer.inputs)
    return True


def fold_weights(model: ir.Model) -> tuple[ir.Model, int]:
    """A copy of `model` (sharing its tensors) whose computed weights are initializers, and how
    many were folded; `model` itself when there is nothing to fold."""
    from lpcompile.ir.run import OrtRunner

    weights = computed_weights(model.graph)
    if not weights:
        return model, 0
    targets = [v.name for v in weights]
    # A Cast into a low-bit type (int4 codes) is done here, in numpy: onnxruntime hands int4
    # tensors to Python in no usable form, and the values before the Cast are exact.
    evaluate = {v.name: (v.producer().inputs[0].name if v.producer().op_type == "Cast" else v.name) for v in weights}
    probe = model.clone()
    values = {v.name: v for node in probe.graph for v in node.outputs}
    probe.graph.outputs.clear()
    probe.graph.outputs.extend(values[name] for name in dict.fromkeys(evaluate.values()))
    common.RemoveUnusedNodesPass()(probe)
    probe.graph.inputs.clear()
    computed = OrtRunner(probe).run({})
    out = model.clone()
    by_name = {v.name: v for node in out.graph for v in node.outputs}
    for name in targets:
        old = by_name[name]
        producer = old.producer()
        dtype = (ir.DataType(producer.attributes["to"].as_int()) if producer.op_type == "Cast"
                 else ir.DataType.from_numpy(np.asarray(computed[name]).dtype))
        array = np.asarray(computed[evaluate[name]]).astype(dtype.numpy())
        folded = ir.Value(name=f"{name}_folded", const_value=ir.tensor(array, dtype=dtype, name=f"{name}_folded"))
        folded.dtype, folded.shape = dtype, ir.Shape(array.shape)
        out.graph.register_initializer(folded)
        old.replace_all_uses_with(folded)
    common.RemoveUnusedNodesPass()(out)
    common.RemoveUnusedFunctionsPass()(out)
    return out, len(targets)
