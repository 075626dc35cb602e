"""Capture: anything a user holds -> the IR (`onnx_ir.Model`), canonicalized.

ONNX files, `ModelProto`s, onnx-graphsurgeon graphs and IR models go through `lpcompile.ir`;
`torch.nn.Module` / `torch.fx.GraphModule` go through `torch.onnx.export(dynamo=True)`
(torch.export underneath) at opset 21, the first with int4 and blocked DequantizeLinear.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import onnx_ir as ir

from lpcompile.errors import ModelError
from lpcompile.ir import load_model
from lpcompile.passes.canonicalize import Canonicalize

log = logging.getLogger(__name__)

EXPORT_OPSET = 21


def _is_torch_module(obj: Any) -> bool:
    # A torch module exists only if torch was imported: importing it just to ask would cost a
    # model file's compile ~300 MB of resident memory and seconds.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def capture(
    model: Any,
    example_inputs: Sequence[Any] | Mapping[str, Any] | None = None,
    dynamic: Sequence[str] | Mapping[str, Mapping[int, str]] | None = None,
    canonicalize: bool = True,
) -> ir.Model:
    """The canonical IR of `model`.

    For torch modules `example_inputs` is required (a tuple of tensors, or a dict of keyword
    inputs). `dynamic` makes dimensions symbolic: a list of dimension names applied to the
    leading axes of every input (`["batch", "seq"]`), or per input `{name: {axis: dim_name}}`.
    """
    if _is_torch_module(model):
        ir_model = _capture_torch(model, example_inputs, dynamic)
    else:
        if example_inputs is not None:
            log.debug("capture: example_inputs ignored for a non-torch model")
        ir_model = load_model(model)
    if canonicalize:
        Canonicalize()(ir_model)
    return ir_model


def _capture_torch(module, example_inputs, dynamic) -> ir.Model:
    import torch

    if example_inputs is None:
        raise ModelError("capturing a torch module needs example_inputs (a tuple of tensors or a dict)")
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
        names = list(kwargs)
        tensors = list(kwargs.values())
    else:
        args, kwargs = tuple(example_inputs), None
        import inspect

        params = [p for p in inspect.signature(module.forward).parameters.values() if p.name != "self"]
        names = [p.name for p in params][: len(args)]
        tensors = list(args)
    dynamic_shapes = _dynamic_shapes(dynamic, names, tensors)
    try:
        program = torch.onnx.export(
            module,
            args,
            kwargs=kwargs,
            dynamo=True,
            opset_version=EXPORT_OPSET,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"torch.onnx.export failed: {first}") from e
    return program.model


def _dynamic_shapes(dynamic, names, tensors):
    if not dynamic:
        return None
    import torch

    dims: dict[str, Any] = {}

    def dim(label):
        if label not in dims:
            dims[label] = torch.export.Dim(label, min=1)
        return dims[label]

    if isinstance(dynamic, Mapping):
        per_input = dynamic
    else:
        per_input = {n: dict(enumerate(dynamic)) for n in names}
    shapes = {}
    for name, tensor in zip(names, tensors):
        axes = per_input.get(name, {})
        rank = getattr(tensor, "ndim", 0)
        spec = {axis: dim(label) for axis, label in axes.items() if axis < rank}
        shapes[name] = spec or None
    return shapes
