"""The importer plumbing: `QdqImporter` subclasses TVM's ONNX graph importer (extended, not
edited), reads the int4 / uint4 initializers and inputs it cannot, gives tensors a converter left
without a usable shape the one ONNX shape inference recorded (`_ShapedNodes`), and looks
lpcompile's converters (`CONVERTERS`, from the sibling modules) up before TVM's own table.
`from_onnx` runs one import under a fresh lowering context and returns the module with the
`LoweringReport`; `compile_model` also builds it.

This module registers the converters; they never import it."""

from __future__ import annotations

import numpy as np
import onnx
import tvm
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as ox

from lpcompile.backends.tvm.lower.context import _ACTIVE, _Context
from lpcompile.backends.tvm.lower.conv import Conv, ConvTranspose
from lpcompile.backends.tvm.lower.gather import Gather
from lpcompile.backends.tvm.lower.hadamard import Hadamard
from lpcompile.backends.tvm.lower.linear import Gemm, MatMul
from lpcompile.backends.tvm.lower.qdq import DequantizeLinear, PerTokenQDQ_int4, PerTokenQDQ_int8, QuantizeLinear
from lpcompile.backends.tvm.lower.report import LoweringReport
from lpcompile.backends.tvm.lower.shapes import SHAPE_OPS, as_tensor, is_scalar, is_shape
from lpcompile.backends.tvm.lower.workarounds import Expand, Range, Reshape
from lpcompile.errors import ModelError
from lpcompile.formats import INT4, UINT4

_ML_DTYPES = {int(f.onnx_type): (f.dtype_name, f.numpy_dtype) for f in (INT4, UINT4)}  # ONNX type -> (name, numpy)


CONVERTERS: dict[str, type] = {
    "Gather": Gather,
    "Reshape": Reshape,
    "Range": Range,
    "DequantizeLinear": DequantizeLinear,
    "QuantizeLinear": QuantizeLinear,
    "PerTokenQDQ_int8": PerTokenQDQ_int8,
    "PerTokenQDQ_int4": PerTokenQDQ_int4,
    "Expand": Expand,
    "Hadamard": Hadamard,
    "MatMul": MatMul,
    "Gemm": Gemm,
    "Conv": Conv,
    "ConvTranspose": ConvTranspose,
}


TENSOR_ALIAS = "lpcompile.tensor::"  # the name a value is read by where it must be a tensor


class _ShapedNodes(dict):
    """The importer's value table. A tensor some converter left without a shape, or with symbolic
    dims unrelated to the graph inputs' (TVM gives a Range its own length variable), gets the
    shape ONNX shape inference recorded for it (value_info) in the inputs' symbolic dims,
    through a match_cast (checked at run time); later ops (broadcasts with other tensors,
    reshapes with -1) then legalize."""

    def __init__(self, base: dict, bb: relax.BlockBuilder, value_info: dict, dims: dict, tensor_shapes: set,
                 outputs: set):
        super().__init__(base)
        self.bb, self.value_info, self.dims = bb, value_info, dims
        self.tensor_shapes, self.outputs = tensor_shapes, outputs

    def __setitem__(self, key, value):
        if key in self.outputs and (is_shape(value) or (is_scalar(value) and not isinstance(value, relax.Var))):
            value = as_tensor(self.bb, value)  # the graph returns tensors
        ty = getattr(value, "ty", None)
        vi = self.value_info.get(key)
        if vi is not None and isinstance(ty, relax.TensorType) and self._unknown(ty):
            dims = vi.type.tensor_type.shape.dim
            if ty.ndim in (-1, len(dims)) and all(d.HasField("dim_value") or d.dim_param in self.dims for d in dims):
                shape = [int(d.dim_value) if d.HasField("dim_value") else self.dims[d.dim_param] for d in dims]
                if not isinstance(value, relax.Var):
                    value = self.bb.emit(value)
                value = self.bb.match_cast(value, relax.TensorType(shape, ty.dtype))
        super().__setitem__(key, value)
        if key in self.tensor_shapes:  # read by an op that computes on tensors: also as a tensor
            super().__setitem__(TENSOR_ALIAS + key, as_tensor(self.bb, value) if is_shape(value) else value)

    def _unknown(self, ty: relax.TensorType) -> bool:
        """No shape, or dims that are symbolic but none of the graph inputs' (e.g. a Range's
        length): broadcasting cannot tell them equal to the inputs' dims."""
        if ty.shape is None:
            return True
        values = getattr(ty.shape, "values", None)
        if values is None:
            return False
        known = {id(v) for v in self.dims.values()}
        return any(isinstance(v, tirx.Var) and not any(v.same_as(k) for k in self.dims.values()) for v in values) and bool(known)


class QdqImporter(ox.ONNXGraphImporter):
    """TVM's ONNX graph importer with lpcompile's converters in front of its own."""

    def _construct_nodes(self, graph):
        dims = {}
        for inp in graph.input:  # the symbolic dims TVM made for the inputs, by name
            var = self._nodes.get(inp.name)
            shape = getattr(getattr(var, "ty", None), "shape", None)
            if shape is None or not hasattr(shape, "values"):
                continue
            for d, v in zip(inp.type.tensor_type.shape.dim, shape.values):
                if d.dim_param and isinstance(v, tirx.Var):
                    dims.setdefault(d.dim_param, v)
        value_info = {v.name: v for v in graph.value_info if v.type.tensor_type.HasField("shape")}
        # A shape value (ShapeExpr) read by an op whose TVM converter takes none (not in
        # shapes.SHAPE_OPS) is read from a tensor alias of it, so its other readers keep it
        # symbolic: the nodes are copied with those inputs renamed (the caller's graph is not touched)
        nodes = onnx.GraphProto()
        nodes.node.extend(graph.node)
        tensor_shapes = set()
        for node in nodes.node:
            if node.op_type not in SHAPE_OPS and node.op_type != "If":
                for i, name in enumerate(node.input):
                    if name:
                        tensor_shapes.add(name)
                        node.input[i] = TENSOR_ALIAS + name
        outputs = {o.name for o in graph.output}
        self._nodes = _ShapedNodes(self._nodes, self.bb, value_info, dims, tensor_shapes, outputs)
        for name in tensor_shapes & set(self._nodes):  # graph inputs and initializers, already read
            dict.__setitem__(self._nodes, TENSOR_ALIAS + name, self._nodes[name])
        super()._construct_nodes(nodes)

    def _parse_graph_input(self, graph):
        """4-bit graph inputs are held one code per byte (int8 / uint8); their type is kept."""
        four = {i.name: i.type.tensor_type.elem_type for i in graph.input
                if i.type.tensor_type.elem_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)}
        if four:
            self._dtype = {name: "int8" if t == onnx.TensorProto.INT4 else "uint8" for name, t in four.items()}
        super()._parse_graph_input(graph)
        ctx = _ACTIVE.get()
        for name, t in four.items():
            ctx.low_bit_inputs[self._nodes[name]] = "int4" if t == onnx.TensorProto.INT4 else "uint4"

    def _parse_graph_initializers(self, graph):
        low_bit = [t for t in graph.initializer if t.data_type in _ML_DTYPES]
        rest = [t for t in graph.initializer if t.data_type not in _ML_DTYPES]
        ctx = _ACTIVE.get()
        for t in low_bit:  # TVM cannot hold int4 tensors: keep them widened to int8, remember the type
            dtype, npt = _ML_DTYPES[t.data_type]
            arr = onnx.numpy_helper.to_array(t).astype(npt).reshape(tuple(t.dims))
            wide = arr.astype(np.int8 if dtype == "int4" else np.uint8)
            c = relax.const(wide)
            self._nodes[t.name] = c
            ctx.low_bit_consts[c] = (dtype, wide)
        filtered = onnx.GraphProto()
        filtered.initializer.extend(rest)
        super()._parse_graph_initializers(filtered)

    def _check_for_unsupported_ops(self, graph):
        unknown = {n.op_type for n in graph.node if n.op_type not in CONVERTERS} - {"Constant", "If"}
        unknown -= set(ox._get_convert_map())
        if unknown:
            raise ModelError(f"operators without a TVM converter: {', '.join(sorted(unknown))}")

    def _convert_operator(self, op_name, inputs, attrs, opset):
        converter = CONVERTERS.get(op_name)
        if converter is None:
            return super()._convert_operator(op_name, inputs, attrs, opset)
        version = 1 if converter in (PerTokenQDQ_int8, PerTokenQDQ_int4, Hadamard) else opset
        sym = converter.get_converter(version)(self.bb, inputs, attrs, [self._nodes, self._params])
        return self.bb.normalize(sym) if isinstance(sym, relax.Expr) else sym


def from_onnx(
    model: onnx.ModelProto, target: tvm.target.Target, shape_dict: dict[str, list] | None = None
) -> tuple[tvm.IRModule, LoweringReport]:
    """Import a QDQ ONNX model into Relax with quantized linear layers on lpcompile's kernels."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    importer = QdqImporter(shape_dict or {}, "float32")
    ctx = _Context(target, importer.bb)
    token = _ACTIVE.set(ctx)
    try:
        mod = importer.from_onnx(model.graph, opset)
    finally:
        _ACTIVE.reset(token)
    mod = relax.transform.DeadCodeElimination()(mod)
    for name, func in ctx.external.items():  # (after DCE: relax refers to them by name only)
        mod[tvm.ir.GlobalVar(name)] = func
    return mod, ctx.report


def compile_model(model: onnx.ModelProto, target: tvm.target.Target, shape_dict: dict[str, list] | None = None):
    """from_onnx + build (lpcompile's pipeline): returns (executable, report)."""
    from lpcompile.backends.tvm.pipeline import build

    mod, report = from_onnx(model, target, shape_dict)
    return build(mod, target), report
