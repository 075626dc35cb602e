"""The IR is `onnx_ir.Model`. This package converts to and from it at the API edge and runs it.

Everything that enters lpcompile goes through `load_model`, so every later stage may assume an
`onnx_ir.Model` whose large weights are still lazy (external data is read when first touched).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from lpcompile.errors import ModelError

__all__ = ["DOMAIN", "load_model", "to_proto", "save_model", "model_bytes", "weight_bytes", "ModelSource"]

# The ONNX domain of lpcompile's custom ops and model-local functions (Hadamard, PerTokenQDQ_*).
DOMAIN = "ai.lpcompile"

ModelSource = "str | os.PathLike | onnx.ModelProto | ir.Model | Any"

# ModelProto.SerializeToString fails beyond 2 GiB; larger models go through a file with external data.
_PROTO_LIMIT = 1_800_000_000
# save_model writes weights inline up to this many bytes, beyond it into `<name>.data`.
_INLINE_LIMIT = 256 << 20


def load_model(source: Any) -> ir.Model:
    """An `onnx_ir.Model` from a path, a `ModelProto`, an onnx-graphsurgeon graph or an IR model.

    A path keeps its external data lazy. Errors are `ModelError` with a one-line reason.
    """
    if isinstance(source, ir.Model):
        return source
    if isinstance(source, onnx.ModelProto):
        return _deserialize(source, "ModelProto")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ModelError(f"no such file: {path}")
        if path.is_dir():
            raise ModelError(f"expected an .onnx file, got a directory: {path}")
        try:
            onnx.checker.check_model(str(path), full_check=False)
            return ir.load(path)
        except onnx.checker.ValidationError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{path} is not a valid ONNX model: {first}") from e
        except Exception as e:  # protobuf DecodeError and friends
            raise ModelError(f"{path} is not a readable ONNX model: {type(e).__name__}: {_first_line(e)}") from e
    if type(source).__module__.startswith("onnx_graphsurgeon"):
        import onnx_graphsurgeon as gs

        return _deserialize(gs.export_onnx(source), "onnx-graphsurgeon graph")
    raise ModelError(f"cannot read a model from {type(source).__name__}")


def _deserialize(proto: onnx.ModelProto, what: str) -> ir.Model:
    try:
        return ir.serde.deserialize_model(proto)
    except Exception as e:
        raise ModelError(f"{what} is not a valid ONNX model: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """A self-contained ModelProto: weights the IR keeps lazy (external data, spilled weights)
    are read into it, on a copy of the graph (the model keeps them lazy)."""
    return ir.serde.serialize_model(_in_memory(model))


def _in_memory(model: ir.Model) -> ir.Model:
    """`model`, or where some weights are external, a copy with those read into memory."""
    if any(isinstance(v.const_value, ir.ExternalTensor) for g in (model.graph, *model.graph.subgraphs())
           for v in g.initializers.values()):
        model = model.clone()
        ir.external_data.load_to_model(model)
    return model


def to_graphsurgeon(model: ir.Model):
    """An onnx-graphsurgeon graph of the model (for tools built on it)."""
    import onnx_graphsurgeon as gs

    return gs.import_onnx(to_proto(model))


def weight_bytes(model: ir.Model) -> int:
    """Bytes of the model's initializers as stored (read from shapes: nothing is loaded)."""
    return sum(_nbytes(v.const_value) for v in model.graph.initializers.values())


def save_model(model: ir.Model, path: str | os.PathLike) -> None:
    """Save with weights inline when they total under _INLINE_LIMIT, else next to it as
    `<name>.data`, written one tensor at a time (an inline save holds every weight twice more:
    the proto and its bytes)."""
    path = Path(path)
    total = weight_bytes(model)
    if total < _INLINE_LIMIT:
        ir.save(_in_memory(model), path)  # lazy weights read in: the file must stand alone
    else:
        ir.save(model, path, external_data=path.name + ".data")


def model_bytes(model: ir.Model) -> bytes | str:
    """What onnxruntime's InferenceSession accepts: serialized bytes, or a path for huge models.

    For huge models the file lives in a temporary directory kept alive as long as the process.
    """
    total = sum(_nbytes(v.const_value) for v in model.graph.initializers.values())
    if total < _PROTO_LIMIT:
        return to_proto(model).SerializeToString()
    tmp = tempfile.mkdtemp(prefix="lpcompile-")
    path = os.path.join(tmp, "model.onnx")
    ir.save(model, path, external_data="model.onnx.data")
    return path


def _nbytes(tensor) -> int:
    if tensor is None:
        return 0
    try:
        return int(tensor.nbytes)
    except Exception:
        return 0


def upgrade_opset(model: ir.Model, version: int) -> bool:
    """Raise the default-domain opset to `version` in place (onnx's version converter, which
    rewrites changed ops such as ReduceMean's axes attribute -> input). False if already there."""
    current = model.graph.opset_imports.get("", 0)
    if current >= version:
        return False
    try:
        # External weights travel as references (the converter rewrites nodes, never reads them)
        converted = onnx.version_converter.convert_version(ir.serde.serialize_model(model), version)
        new = ir.serde.deserialize_model(converted)
    except Exception as e:
        raise ModelError(f"cannot upgrade the model from opset {current} to {version}: {_first_line(e)}") from e
    # the model's own tensor objects back (lazy ones stay lazy, in-memory ones are not held twice)
    tensors = {name: v.const_value for name, v in model.graph.initializers.items()}
    for name, value in new.graph.initializers.items():
        if tensors.get(name) is not None:
            value.const_value = tensors[name]
    model.graph = new.graph
    model.functions.clear()
    model.functions.update(new.functions)
    model.ir_version = max(model.ir_version, new.ir_version)
    return True
