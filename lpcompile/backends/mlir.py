"""The quantized model as MLIR through torch-mlir (issue 15 item 4; `lpcompile[mlir]`).

    text = to_mlir(qdq_proto, "torch")      # the torch dialect (torch-mlir's ONNX importer + onnx-to-torch)
    text = to_mlir(qdq_proto, "linalg")     # linalg-on-tensors, where torch-mlir lowers every op
    emit_mlir(qdq_proto, "out/")            # model.torch.mlir (+ model.linalg.mlir): --emit mlir
    run = LinalgRunner(qdq_proto)           # linalg -> LLVM, run by MLIR's ExecutionEngine (tests)

torch-mlir 20261001 converts `DequantizeLinear` only per tensor with a zero point: the per-channel
and blocked weights every recipe writes fail ("failed to legalize operation 'torch.operator'
... onnx.DequantizeLinear"), and it has no 4-bit type to compute on. So before importing,
`dequantize_as_arithmetic` writes each DequantizeLinear of constant weights as the arithmetic
ONNX defines for it, `Mul(Cast(q) - zero_point, scale)` with the scale broadcast along its axis
(blocked scales through a reshape to [.., K/B, B, ..]), keeping the codes as 8-bit integer
constants: int4 / uint4 codes are widened to int8 / uint8 (MLIR holds them one per byte, so an
int4 model is as large as an int8 one here). Activation Q/DQ pairs (per tensor, constant scale)
stay QuantizeLinear / DequantizeLinear, which torch-mlir lowers. Functions must be inlined first
(the portable form, `backends.onnx.portable`, is what this reads).
"""

from __future__ import annotations

import ctypes
from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lpcompile.errors import BackendError
from lpcompile.extras import require

DIALECTS = ("torch", "linalg")
_WIDEN = {TensorProto.INT4: np.int8, TensorProto.UINT4: np.uint8}


def dequantize_as_arithmetic(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Counter]:
    """A copy of `model` whose DequantizeLinear nodes of constant weights are Cast/Sub/Mul (see
    the module docstring); returns it and what was rewritten, by kind."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    done: Counter = Counter()
    nodes = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or any(
                i and i not in inits for i in node.input):
            nodes.append(node)
            continue
        q_t = inits[node.input[0]]
        q = numpy_helper.to_array(q_t)
        if q_t.data_type in _WIDEN:
            q = q.astype(_WIDEN[q_t.data_type])
        elif q_t.data_type not in (TensorProto.INT8, TensorProto.UINT8, TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2):
            nodes.append(node)  # (float4 codes: left to torch-mlir, which reports it)
            continue
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        zp = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32) if len(node.input) > 2 and node.input[2] else None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axis = int(attrs.get("axis", 1)) % max(q.ndim, 1)
        block = int(attrs.get("block_size", 0))
        base = node.output[0]
        shape = list(q.shape)
        codes = numpy_helper.from_array(q, base + ".codes") if q_t.data_type in _WIDEN else _renamed(q_t, base + ".codes")
        new = [codes]
        steps = [helper.make_node("Cast", [base + ".codes"], [base + ".f"], to=TensorProto.FLOAT, name=base + ".cast")]
        value = base + ".f"
        if block and shape[axis] % block == 0 and scale.size > 1:
            split = shape[:axis] + [shape[axis] // block, block] + shape[axis + 1:]
            new.append(numpy_helper.from_array(np.array(split, np.int64), base + ".split"))
            new.append(numpy_helper.from_array(np.array(shape, np.int64), base + ".shape"))
            steps.append(helper.make_node("Reshape", [value, base + ".split"], [base + ".blocks"], name=base + ".blocks"))
            value = base + ".blocks"
            expand = lambda a: np.expand_dims(a, axis + 1)  # noqa: E731  [.., K/B, 1, ..]
            kind = "blocked"
        elif block and scale.shape[axis] == 1:  # one block along the axis: a per-channel broadcast as stored
            expand = lambda a: a  # noqa: E731
            kind = "blocked (one block)"
        elif block and scale.size > 1:
            expand = lambda a: np.take(np.repeat(a, block, axis=axis), np.arange(shape[axis]), axis=axis)  # noqa: E731
            kind = "blocked (scale expanded: K not a multiple of the block)"
        elif scale.size > 1:
            bshape = [1] * q.ndim
            bshape[axis] = -1
            expand = lambda a: a.reshape(bshape)  # noqa: E731
            kind = "per-channel"
        else:
            expand = lambda a: a.reshape(())  # noqa: E731
            kind = "per-tensor"
        if zp is not None and np.any(zp != 0):
            new.append(numpy_helper.from_array(expand(zp).astype(np.float32), base + ".zp"))
            steps.append(helper.make_node("Sub", [value, base + ".zp"], [base + ".centred"], name=base + ".sub"))
            value = base + ".centred"
        new.append(numpy_helper.from_array(expand(scale), base + ".scale"))
        scaled = base + ".scaled" if kind == "blocked" else base
        steps.append(helper.make_node("Mul", [value, base + ".scale"], [scaled], name=base + ".mul"))
        if kind == "blocked":
            steps.append(helper.make_node("Reshape", [scaled, base + ".shape"], [base], name=base + ".unblock"))
        graph.initializer.extend(new)
        nodes.extend(steps)
        done[f"{kind} {TensorProto.DataType.Name(q_t.data_type).lower()} weights"] += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return out, done


def _renamed(t: onnx.TensorProto, name: str) -> onnx.TensorProto:
    copy = onnx.TensorProto()
    copy.CopyFrom(t)
    copy.name = name
    return copy


def _import(model: onnx.ModelProto):
    """torch-mlir's ONNX importer: (context, module) in the torch-onnx form."""
    require("torch_mlir", "MLIR output")
    from torch_mlir import ir
    from torch_mlir.dialects import torch as torch_d
    from torch_mlir.extras import onnx_importer

    if any(f.domain not in ("", "ai.onnx") for f in model.functions):
        raise BackendError("MLIR output reads the portable QDQ form: inline lpcompile's functions first "
                           "(lpcompile.backends.onnx.portable)")
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    context = ir.Context()
    torch_d.register_dialect(context)
    info = onnx_importer.ModelInfo(model)
    module = info.create_module(context=context)
    onnx_importer.NodeImporter.define_function(info.main_graph, module.operation).import_all()
    module.operation.verify()
    return context, module


def _run(context, module, pipeline: str, stage: str) -> None:
    from torch_mlir.passmanager import PassManager

    with context:
        try:
            PassManager.parse(f"builtin.module({pipeline})").run(module.operation)
        except Exception as e:  # MLIRError: the first diagnostic is the reason
            lines = [l.strip() for l in str(e).splitlines() if l.strip().startswith("error:")]
            raise BackendError(f"torch-mlir cannot lower the model to {stage}: "
                               f"{lines[0] if lines else str(e).splitlines()[0]}") from e


def to_mlir(model: onnx.ModelProto, dialect: str = "torch") -> str:
    """The model as MLIR text in the torch dialect (value semantics, the torch backend contract)
    or in linalg-on-tensors. Raises BackendError naming the first op that does not lower."""
    if dialect not in DIALECTS:
        raise BackendError(f"unknown MLIR dialect {dialect!r}; choose one of: {', '.join(DIALECTS)}")
    context, module = _import(dequantize_as_arithmetic(model)[0])
    _run(context, module, "torch-onnx-to-torch-backend-pipeline", "the torch dialect")
    if dialect == "linalg":
        _run(context, module, "torch-backend-to-linalg-on-tensors-backend-pipeline", "linalg-on-tensors")
    return str(module)


def emit_mlir(model: onnx.ModelProto, out_dir) -> dict:
    """`model.torch.mlir` (the torch dialect) into `out_dir`, and `model.linalg.mlir` where
    torch-mlir lowers every op to linalg-on-tensors; returns the report's `mlir` record (files,
    the weights rewritten as arithmetic, and why a level was not written). Raises BackendError
    when not even the torch dialect can be written."""
    from pathlib import Path

    out = Path(out_dir)
    ready, rewritten = dequantize_as_arithmetic(model)
    context, module = _import(ready)
    _run(context, module, "torch-onnx-to-torch-backend-pipeline", "the torch dialect")
    (out / "model.torch.mlir").write_text(str(module))
    record = {"files": ["model.torch.mlir"], "weights_as_arithmetic": dict(rewritten), "not_written": {}}
    try:
        _run(context, module, "torch-backend-to-linalg-on-tensors-backend-pipeline", "linalg-on-tensors")
    except BackendError as e:
        record["not_written"]["model.linalg.mlir"] = str(e)
    else:
        (out / "model.linalg.mlir").write_text(str(module))
        record["files"].append("model.linalg.mlir")
    return record

# linalg-on-tensors -> LLVM for MLIR's ExecutionEngine: bufferize, then the reference backend's
# calling convention (arguments as unranked memrefs, results handed to a callback), then loops
_TO_LLVM = ",".join([
    "func.func(refback-generalize-tensor-pad)", "func.func(refback-generalize-tensor-concat)",
    "func.func(linalg-generalize-named-ops)", "func.func(linalg-fuse-elementwise-ops)", "convert-shape-to-std",
    "func.func(tm-tensor-bufferize)",
    "one-shot-bufferize{copy-before-write bufferize-function-boundaries function-boundary-type-conversion=identity-layout-map}",
    "refback-mlprogram-bufferize", "func.func(buffer-deallocation-pipeline)", "inline",
    "refback-munge-calling-conventions",
    "func.func(tm-tensor-to-loops)", "func.func(refback-munge-memref-copy)", "func.func(convert-linalg-to-loops)",
    "func.func(lower-affine)", "convert-scf-to-cf", "func.func(refback-expand-ops-for-llvm)", "func.func(arith-expand)",
    "func.func(convert-math-to-llvm)", "convert-math-to-libm", "expand-strided-metadata", "finalize-memref-to-llvm",
    "lower-affine", "convert-bufferization-to-memref", "finalize-memref-to-llvm", "func.func(convert-arith-to-llvm)",
    "convert-vector-to-llvm", "convert-func-to-llvm", "convert-cf-to-llvm", "convert-complex-to-llvm",
    "reconcile-unrealized-casts",
])
_RETURN = "refbackend_consume_func_return_"
_MEMREF_DTYPES = {"mrf32": np.float32, "mrf64": np.float64, "mri64": np.int64, "mri32": np.int32, "mri8": np.int8,
                  "mri1": np.bool_}


class LinalgRunner:
    """The model lowered through linalg-on-tensors to LLVM and run by MLIR's ExecutionEngine
    (what the tests compare with onnxruntime): `runner(x, ...)` -> tuple of numpy outputs."""

    def __init__(self, model: onnx.ModelProto):
        from torch_mlir.execution_engine import ExecutionEngine

        self.inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        context, module = _import(dequantize_as_arithmetic(model)[0])
        _run(context, module, "torch-onnx-to-torch-backend-pipeline", "the torch dialect")
        _run(context, module, "torch-backend-to-linalg-on-tensors-backend-pipeline", "linalg-on-tensors")
        self.function = str(module.body.operations[0].attributes["sym_name"]).strip('"')
        _run(context, module, _TO_LLVM, "LLVM")
        self._results = None
        with context:
            self._engine = ExecutionEngine(module, opt_level=2)
        self._callbacks = []  # must outlive the engine
        for name in {l.split("@")[1].split("(")[0] for l in str(module).splitlines()
                     if "llvm.func" in l and "@" + _RETURN in l}:
            self._register(name)

    def _register(self, name: str) -> None:
        from torch_mlir.runtime import UnrankedMemRefDescriptor, unranked_memref_to_numpy

        kinds = name[len(_RETURN):].split("_")
        if any(k not in _MEMREF_DTYPES for k in kinds):
            raise BackendError(f"MLIR runner: results of types {kinds} are not supported")

        def consume(*args):
            self._results = tuple(unranked_memref_to_numpy(a, _MEMREF_DTYPES[k]).copy() for a, k in zip(args, kinds))

        callback = ctypes.CFUNCTYPE(None, *[ctypes.POINTER(UnrankedMemRefDescriptor)] * len(kinds))(consume)
        self._callbacks.append(callback)
        self._engine.register_runtime(name, callback)

    def __call__(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        from torch_mlir.runtime import get_unranked_memref_descriptor

        keep = [np.ascontiguousarray(a) for a in arrays]
        args = [ctypes.pointer(ctypes.pointer(get_unranked_memref_descriptor(a))) for a in keep]
        self._results = None
        self._engine.invoke(self.function, *args)
        return self._results
