"""The report: what was quantized, how many bytes it takes, and how far it is from float.

Errors are measured, never estimated: the float model and the QDQ model both run in
onnxruntime on the same batches; per layer the SQNR of that layer's output (with the error
accumulated from the layers before it, as the model really runs), and for each model output the
SQNR and the cosine similarity per sample.
"""

from lpcompile.report.measure import (
    build_report, exponent_agreement, measure_error, quantized_layers, select_report, weight_bytes,
)
from lpcompile.report.render import dumps, select_markdown, to_markdown

__all__ = ["build_report", "measure_error", "quantized_layers", "weight_bytes", "select_report", "exponent_agreement",
           "dumps", "to_markdown", "select_markdown"]
