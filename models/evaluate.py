"""Compare a quantized model against its float original on held-out inputs, in onnxruntime.

    python -m models.evaluate FLOAT.onnx QUANT.onnx EVAL.npz [--json OUT.json]

For sentence embedders (MiniLM) the output rows are the sentence embeddings, so the cosine per
row is the number that matters for retrieval; SQNR is over all output values.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from lpcompile.calibration_data import as_calibration_data
from lpcompile.ir import load_model
from lpcompile.report import measure_error


def evaluate(float_path: str, quant_path: str, eval_path: str, batch_size: int = 16) -> dict:
    float_model = load_model(float_path)
    quant_model = load_model(quant_path)
    data = as_calibration_data(eval_path, float_model)
    _, outputs = measure_error(float_model, quant_model, data.batches(batch_size))
    result = {"samples": data.num_samples, "outputs": {}}
    for name, err in outputs.items():
        cos = np.array(err.cosines)
        result["outputs"][name] = {
            "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()),
            "sqnr_db": float(err.sqnr_db),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("float_model")
    p.add_argument("quant_model")
    p.add_argument("eval_npz")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    result = evaluate(args.float_model, args.quant_model, args.eval_npz)
    for name, r in result["outputs"].items():
        print(f"{name}: {result['samples']} held-out samples: cosine mean {r['cosine_mean']:.5f} "
              f"min {r['cosine_min']:.5f}, SQNR {r['sqnr_db']:.2f} dB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
