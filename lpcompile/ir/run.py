"""Execute the IR in onnxruntime — the reference every pass and backend is checked against.

Sessions are built with graph optimizations disabled: at default levels onnxruntime rewrites
DQ(int) + MatMul into its own MatMulNBits / QLinearMatMul, which changes the numbers we are
trying to check (ENVIRONMENT.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from lpcompile.errors import ModelError
from lpcompile.ir import model_bytes, to_proto


def session_options(threads: int | None = None, optimize: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return so


class OrtRunner:
    """Runs an IR model in onnxruntime (CPU), optionally exposing intermediate values as outputs.

    `run(feeds)` returns a dict name -> array for the model outputs and every name in `extra`.
    """

    def __init__(self, model: ir.Model, extra: Sequence[str] = (), threads: int | None = None):
        import onnxruntime as ort

        proto = to_proto(model) if not extra else _with_outputs(to_proto(model), extra)
        source = proto.SerializeToString() if proto.ByteSize() < 1_800_000_000 else model_bytes(ir.serde.deserialize_model(proto))
        try:
            self.session = ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ModelError(f"onnxruntime cannot load the model: {str(e).strip().splitlines()[0]}") from e
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ModelError(f"missing model inputs: {', '.join(missing)}")
        arrays = self.session.run(self.output_names, {n: feeds[n] for n in self.input_names})
        return dict(zip(self.output_names, arrays))

    def run_all(self, batches: Iterable[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        return [self.run(b) for b in batches]


def _with_outputs(proto: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    existing = {o.name for o in proto.graph.output}
    for name in names:
        if name not in existing:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
            existing.add(name)
    return proto
