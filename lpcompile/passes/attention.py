"""quantize_attention: activation x activation matmuls (attention scores Q·Kᵀ and context P·V,
any `MatMul` whose two inputs are computed) get static per-tensor quantize-dequantize pairs on
both inputs (issue 11 item 3).

    QuantizeAttention(data, "int8")(model)     # after Quantize: the ranges are the ones the
                                               # quantized model produces

int8: symmetric (zero point 0) so the product is a plain int8 x int8 -> int32 dot product (the TVM
backend runs it on the codes); fp8: E4M3 with zero point 0 (TVM decodes the codes to float:
emulated, no FP8 arithmetic on CPUs). Scales come from the largest |x| the calibration batches
give each input (the softmax probabilities' max is at most 1). Off by default: it adds the
error of two more roundings per attention head (the report measures it; `--quantize-attention`).

Each matmul is tagged like a quantized layer (`lpcompile.activation_format`, `lpcompile.layer`)
so the report measures its output error and the TVM manifest says how it runs.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from lpcompile.calibration_data import CalibrationData
from lpcompile.errors import LpcompileError
from lpcompile.formats import FP8_E4M3, INT8, MIN_SCALE, PerTensor, QuantSpec
from lpcompile.ir.patterns import LAYER_NAME_KEY
from lpcompile.ir.run import OrtRunner
from lpcompile.passes.quantize import ACTIVATION_FORMAT_KEY, _fresh_base, _initializer, _storage

log = logging.getLogger(__name__)

FORMATS = {"int8": QuantSpec(INT8, PerTensor(), symmetric=True),
           "fp8": QuantSpec(FP8_E4M3, PerTensor(), symmetric=True)}
REPORT_KEY = "lpcompile.quantize_attention"


def check_format(name: str | None) -> str | None:
    """The attention format asked for (None: off), or a one-line refusal."""
    if name in (None, "off"):
        return None
    if name not in FORMATS:
        raise LpcompileError(f"quantize_attention must be one of {', '.join(FORMATS)} or off, got {name!r}")
    return name


def activation_matmuls(graph: ir.Graph) -> list[ir.Node]:
    """MatMul nodes whose two inputs are computed (neither an initializer, a constant nor a graph
    input: the model's own activations), not already quantized."""
    def computed(v: ir.Value | None) -> bool:
        if v is None or v.const_value is not None or v.is_graph_input():
            return False
        producer = v.producer()
        return producer is not None and producer.op_type not in ("Constant", "DequantizeLinear")

    return [n for n in graph if n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and len(n.inputs) == 2
            and all(computed(v) for v in n.inputs) and all(v.dtype in (None, ir.DataType.FLOAT) for v in n.inputs)]


@dataclass(frozen=True)
class QuantizeAttention(ir.passes.InPlacePass):
    """Quantize both inputs of every activation x activation MatMul in `format` ("int8", "fp8"),
    scales from the largest |x| over `data` (run through onnxruntime on the model as it stands)."""

    data: CalibrationData
    format: str = "int8"
    batch_size: int = 8
    stats: Counter = field(default_factory=Counter, compare=False)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        spec = FORMATS[self.format]
        sites = activation_matmuls(model.graph)
        if not sites:
            model.meta[REPORT_KEY] = {"format": self.format, "matmuls": []}
            return ir.passes.PassResult(model, modified=False)
        names = sorted({v.name for n in sites for v in n.inputs})
        absmax = dict.fromkeys(names, 0.0)
        runner = OrtRunner(model, extra=names)
        for batch in self.data.batches(self.batch_size):
            out = runner.run(batch)
            for name in names:
                absmax[name] = max(absmax[name], float(np.abs(out[name]).max(initial=0.0)))
        del runner
        fmt = spec.format
        records = []
        for node in sites:
            qdq = {}
            for i, x in enumerate(node.inputs):
                scale = max(absmax[x.name] / fmt.max_finite, MIN_SCALE)
                node.replace_input_with(i, self._qdq(model.graph, node, x, scale, fmt))
                qdq[x.name] = {"absmax": absmax[x.name], "scale": scale}
            name = node.name or node.outputs[0].name
            node.metadata_props[ACTIVATION_FORMAT_KEY] = str(spec)
            node.metadata_props.setdefault(LAYER_NAME_KEY, name)
            records.append({"name": node.metadata_props[LAYER_NAME_KEY], "inputs": qdq})
            self.stats["matmuls"] += 1
        model.meta[REPORT_KEY] = {"format": self.format, "matmuls": records}
        log.info("quantize_attention: %d activation x activation matmuls in %s", len(records), self.format)
        return ir.passes.PassResult(model, modified=True)

    @staticmethod
    def _qdq(graph: ir.Graph, before: ir.Node, x: ir.Value, scale: float, fmt) -> ir.Value:
        base = _fresh_base(graph, x.name)
        scale_v = _initializer(graph, f"{base}_scale", np.array(scale, np.float32))
        zp_v = _initializer(graph, f"{base}_zero_point", _storage(np.array(0.0, np.float32), fmt))
        q = ir.node("QuantizeLinear", [x, scale_v, zp_v], name=f"{base}_quantize")
        q.outputs[0].name = f"{base}_q"
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale_v, zp_v], name=f"{base}_dequantize")
        dq.outputs[0].name = f"{base}_qdq"
        dq.outputs[0].dtype = ir.DataType.FLOAT
        dq.outputs[0].shape = x.shape
        graph.insert_before(before, [q, dq])
        return dq.outputs[0]
