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
from lpcompile.ir.store import release


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

        options = session_options(threads)
        proto, self._weights = _graph_and_weights(model)
        if extra:
            proto = _with_outputs(proto, extra)
        if self._weights:
            names, values = zip(*self._weights.items())
            options.add_external_initializers(list(names), list(values))
        try:
            self.session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
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


# Weights at least this large reach onnxruntime as numpy buffers, not as protobuf bytes.
_HANDED_OVER_BYTES = 1 << 16
_NUMPY_NATIVE = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.INT8, ir.DataType.UINT8,
                 ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32, ir.DataType.UINT32, ir.DataType.INT64,
                 ir.DataType.UINT64, ir.DataType.BOOL}


def _graph_and_weights(model: ir.Model) -> tuple[onnx.ModelProto, dict]:
    """The model as a ModelProto whose large weights are external-data stubs, and those weights
    as OrtValues over the tensors' own memory (`SessionOptions.add_external_initializers`: no
    copy; a memory-mapped external tensor is read by onnxruntime straight from the page cache).
    Serializing whole (the old way) held every weight three times over: the proto, its bytes and
    onnxruntime's copy, and made large models go through a temporary file."""
    import onnxruntime as ort

    shell = model.clone()  # new values, the same tensors: swapping a const_value here leaves `model` alone
    weights = {}
    for graph in shell.graphs():
        if graph is shell.graph:
            continue
        for name, value in graph.initializers.items():  # subgraphs' weights: inline
            if isinstance(value.const_value, ir.ExternalTensor):
                value.const_value = ir.Tensor(value.const_value.numpy().copy(), dtype=value.const_value.dtype, name=name)
    for name, value in shell.graph.initializers.items():
        tensor = value.const_value
        if tensor is None:
            continue
        if tensor.dtype not in _NUMPY_NATIVE or tensor.nbytes < _HANDED_OVER_BYTES:
            if isinstance(tensor, ir.ExternalTensor):  # a model loaded from bytes has no directory to read it from
                value.const_value = ir.Tensor(tensor.numpy().copy(), dtype=tensor.dtype, name=name)
                release(tensor)
            continue
        array = tensor.numpy()
        if not array.flags.c_contiguous or not array.dtype.isnative:
            array = np.ascontiguousarray(array, array.dtype.newbyteorder("="))
        weights[name] = ort.OrtValue.ortvalue_from_numpy(array)
        # a stub: serialized as a reference to data that is never read (onnxruntime takes the OrtValue)
        value.const_value = ir.ExternalTensor(f"lpcompile-weight-{len(weights)}", 0, tensor.nbytes, tensor.dtype,
                                              shape=tensor.shape, name=name)
    return ir.serde.serialize_model(shell), weights


def _with_outputs(proto: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    existing = {o.name for o in proto.graph.output}
    for name in names:
        if name not in existing:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
            existing.add(name)
    return proto
