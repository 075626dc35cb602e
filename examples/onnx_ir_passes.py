"""lpcompile's passes in an onnx_ir pass manager, next to onnx_ir's own passes: the pipeline is
yours to compose (here: canonicalize, calibrate, a uniform int4 plan with GPTQ, quantize,
cleanup, then onnx_ir's topological sort). The result is a standard QDQ ONNX model, checked in
onnxruntime against the float model. Usage: python examples/onnx_ir_passes.py [OUT.onnx]"""

from __future__ import annotations

import sys
import tempfile

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from tiny_model import calibration, mlp_model

from lpcompile.calibration_data import as_calibration_data
from lpcompile.formats import QuantSpec
from lpcompile.passes import Calibrate, Canonicalize, Cleanup, Quantize, UniformPlan


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def main(out: str) -> None:
    float_model = ir.from_proto(mlp_model())
    model = ir.from_proto(mlp_model())
    data = as_calibration_data([calibration()], model)
    manager = ir.passes.PassManager([
        Canonicalize(),
        Calibrate(data, gram_for=None),  # gram_for=None: XᵀX of every linear input, for GPTQ
        UniformPlan(weights=QuantSpec.parse("int4:block(0,128):sym"), method="gptq"),
        Quantize(),
        Cleanup(),
        ir.passes.common.TopologicalSortPass(),
    ])
    result = manager(model)
    ops = sorted({n.op_type for n in result.model.graph})
    print("modified:", result.modified, "ops:", ops)
    x = np.random.default_rng(7).standard_normal((16, 64)).astype(np.float32)
    y, ref = run(result.model, x), run(float_model, x)
    cos = float((y * ref).sum() / np.linalg.norm(y) / np.linalg.norm(ref))
    print(f"int4 (GPTQ, blocks of 128) vs float, onnxruntime: cosine {cos:.5f}")
    assert "DequantizeLinear" in ops and cos > 0.98, cos
    ir.save(result.model, out)
    print("OK onnx_ir_passes", out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp() + "/mlp.int4.onnx")
