"""The Python API in an export script: a torch module -> W8A8 (static int8 activations) QDQ ONNX
and a TVM library, then the library run on torch tensors and checked against onnxruntime on the
QDQ model and against the float module. Usage: python examples/export_script.py [OUT_DIR]"""

from __future__ import annotations

import sys
import tempfile

import numpy as np
import torch
from torch import nn

import lpcompile


class Encoder(nn.Module):
    def __init__(self, d: int = 64):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def main(out_dir: str) -> None:
    torch.manual_seed(0)
    model = Encoder().eval()
    example = torch.randn(8, 16, 64)
    calibration = [{"x": torch.randn(8, 16, 64).numpy()} for _ in range(8)]  # by input name: forward(x)
    art = lpcompile.compile(model, example_inputs=(example,), target="llvm", format="int8",
                            calibration=calibration, emit=("onnx", "tvm"))
    print("totals:", {k: art.report["totals"][k] for k in ("layers_quantized", "weight_bytes", "output_cosine")})
    art.save(out_dir)  # model.qdq.onnx, model.so, params.bin, manifest.json, report.md, plan.json

    compiled = lpcompile.runtime.load(out_dir)  # no compiler needed from here on
    x = torch.randn(8, 16, 64)
    y = compiled(x).numpy()
    (reference,) = art.run({"x": x}).values()  # onnxruntime on the QDQ model (optimizations off)
    with torch.no_grad():
        eager = model(x).numpy()
    cos = float((y * eager).sum() / np.linalg.norm(y) / np.linalg.norm(eager))
    diff = float(np.abs(y - reference).max() / np.abs(reference).max())
    print(f"TVM vs onnxruntime (QDQ): max diff {diff:.2e} of range; vs float torch: cosine {cos:.5f}")
    # int8 activations are a step function of the input: another summation order moves a code
    # now and then, so the bound is a few quantization steps, not float rounding
    assert diff < 2e-2 and cos > 0.999, (diff, cos)
    print("OK export_script")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp() + "/encoder.lpc")
