"""Graph patterns every pass relies on: linear layers and normalizations.

A *linear layer* is a node that multiplies an activation by a constant 2-D weight:
`MatMul(x, W)` (W is [K, N]), `Gemm(x, B)` (B is [K, N], or [N, K] with transB=1) and an
embedding lookup `Gather(table, ids)` on a constant [V, D] table. lpcompile describes every such
weight in one canonical layout, [K (in), N (out)] — for an embedding table that is its transpose
[D, V] — so one QuantSpec (`int4:block(0,128)`) means the same thing for all three;
`LinearLayer.storage_axis` maps a canonical axis onto the axis of the stored tensor.

Canonicalization writes what it recognised into node metadata (`lpcompile.pattern`), so the
plan travels with a saved model; the finders here recompute it from the graph and never trust
exporter-specific names.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

PATTERN_KEY = "lpcompile.pattern"
LAYER_NAME_KEY = "lpcompile.layer"


@dataclass(frozen=True)
class LinearLayer:
    node: ir.Node
    kind: str  # "matmul" | "gemm" | "embedding"
    activation: ir.Value | None  # the float input (None for embeddings: their input is indices)
    weight: ir.Value  # the constant weight initializer
    transposed: bool  # stored as [N, K] (Gemm transB=1, embedding tables) rather than [K, N]
    bias: ir.Value | None  # Gemm C, or the constant of a following Add
    output: ir.Value  # the layer's output (after the bias Add where there is one)

    @property
    def name(self) -> str:
        """A stable, readable name: the weight's module path (`encoder.layer.0.attention.q`)
        where the exporter left one, else the node's name."""
        return layer_name(self.node, self.weight)

    @property
    def in_features(self) -> int:
        shape = self.weight.shape
        return int(shape[1] if self.transposed else shape[0])

    @property
    def out_features(self) -> int:
        shape = self.weight.shape
        return int(shape[0] if self.transposed else shape[1])

    def storage_axis(self, canonical_axis: int) -> int:
        """The axis of the stored weight that is `canonical_axis` of the [K, N] layout."""
        return 1 - canonical_axis if self.transposed else canonical_axis


def layer_name(node: ir.Node, weight: ir.Value) -> str:
    if node.metadata_props.get(LAYER_NAME_KEY):
        return node.metadata_props[LAYER_NAME_KEY]
    wname = weight.name or ""
    if wname.endswith(".weight"):
        return wname[: -len(".weight")]
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if scopes:  # torch.onnx (dynamo) records the module path: "['', 'encoder', 'layer', '0', ...]"
        parts = [p.strip(" '\"") for p in scopes.strip("[]").split(",")]
        parts = [p for p in parts if p][:-1]  # the last scope is the aten op
        if parts:  # scopes are cumulative paths ('layers.0', 'layers.0.attn', ...) or single names
            return parts[-1] if all(parts[-1].startswith(p) for p in parts) else ".".join(parts)
    return node.name or wname or "?"


def constant_weight(value: ir.Value | None) -> bool:
    """A graph initializer (not a graph input) with a 2-D float tensor behind it."""
    if value is None or value.const_value is None or value.is_graph_input():
        return False
    tensor = value.const_value
    return len(tensor.shape) == 2 and tensor.dtype in (
        ir.DataType.FLOAT,
        ir.DataType.FLOAT16,
        ir.DataType.BFLOAT16,
        ir.DataType.DOUBLE,
    )


def find_linear_layers(graph: ir.Graph) -> list[LinearLayer]:
    """All linear layers of the main graph, in topological order."""
    layers = []
    for node in graph:
        layer = match_linear(node)
        if layer is not None:
            layers.append(layer)
    return layers


def match_linear(node: ir.Node) -> LinearLayer | None:
    """A LinearLayer if `node` is one, else None (see `why_not_linear` for the reason)."""
    return None if why_not_linear(node) else _build(node)


def why_not_linear(node: ir.Node) -> str | None:
    """Why `node` is not a linear layer, or None when it is."""
    if node.domain not in ("", "ai.onnx"):
        return f"custom domain {node.domain!r}"
    if node.op_type == "MatMul":
        if not constant_weight(node.inputs[1]):
            return "second input is not a constant 2-D float weight"
        return None
    if node.op_type == "Gemm":
        attrs = node.attributes
        if attrs.get("transA") is not None and attrs["transA"].as_int() != 0:
            return "Gemm with transA=1"
        if not constant_weight(node.inputs[1]):
            return "B is not a constant 2-D float weight"
        return None
    if node.op_type == "Gather":
        axis = node.attributes.get("axis")
        if axis is not None and axis.as_int() != 0:
            return "Gather on an axis other than 0"
        if not constant_weight(node.inputs[0]):
            return "table is not a constant 2-D float tensor"
        return None
    return f"{node.op_type} is not a linear op"


def _build(node: ir.Node) -> LinearLayer:
    if node.op_type == "Gather":
        return LinearLayer(node, "embedding", None, node.inputs[0], True, None, node.outputs[0])
    if node.op_type == "Gemm":
        trans_b = node.attributes.get("transB")
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        return LinearLayer(
            node, "gemm", node.inputs[0], node.inputs[1], bool(trans_b and trans_b.as_int()), bias, node.outputs[0]
        )
    bias, output = _following_bias(node)
    return LinearLayer(node, "matmul", node.inputs[0], node.inputs[1], False, bias, output)


def _following_bias(node: ir.Node) -> tuple[ir.Value | None, ir.Value]:
    """MatMul followed by Add of a constant 1-D [N] vector is one linear layer with a bias."""
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None, out
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None, out
    other = add.inputs[1 - uses[0].idx]
    if other is None or other.const_value is None or len(other.const_value.shape) != 1:
        return None, out
    return other, add.outputs[0]


# --- normalizations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Norm:
    kind: str  # "layernorm" | "rmsnorm"
    input: ir.Value
    output: ir.Value
    scale: ir.Value | None
    bias: ir.Value | None
    nodes: tuple[ir.Node, ...]


def find_norms(graph: ir.Graph) -> list[Norm]:
    """LayerNormalization / RMSNormalization nodes and the decomposed RMSNorm pattern
    `x * 1/sqrt(mean(x^2) + eps) [* w]` (written with Pow or Mul, Sqrt+Reciprocal/Div or Rsqrt)."""
    norms = []
    for node in graph:
        if node.op_type in ("LayerNormalization", "RMSNormalization") and node.domain in ("", "ai.onnx"):
            kind = "layernorm" if node.op_type == "LayerNormalization" else "rmsnorm"
            scale = node.inputs[1] if len(node.inputs) > 1 else None
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            norms.append(Norm(kind, node.inputs[0], node.outputs[0], scale, bias, (node,)))
        elif node.op_type == "ReduceMean":
            norm = _match_rms(node)
            if norm is not None:
                norms.append(norm)
    return norms


def _producer_op(value: ir.Value | None) -> ir.Node | None:
    return value.producer() if value is not None else None


def _square_of(node: ir.Node | None) -> ir.Value | None:
    """x if node computes x*x or x**2."""
    if node is None:
        return None
    if node.op_type == "Mul" and node.inputs[0] is node.inputs[1]:
        return node.inputs[0]
    if node.op_type == "Pow":
        exponent = ir.convenience.get_const_tensor(node.inputs[1]) if node.inputs[1] is not None else None
        if exponent is not None and exponent.size == 1 and float(exponent.numpy().reshape(-1)[0]) == 2.0:
            return node.inputs[0]
    return None


def _single_consumer(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 else None


def _match_rms(reduce: ir.Node) -> Norm | None:
    x = _square_of(_producer_op(reduce.inputs[0]))
    if x is None:
        return None
    nodes = [reduce.inputs[0].producer(), reduce]
    node = _single_consumer(reduce.outputs[0])
    if node is None or node.op_type != "Add":
        return None
    nodes.append(node)
    node = _single_consumer(node.outputs[0])
    if node is None:
        return None
    if node.op_type == "Rsqrt":
        nodes.append(node)
        inv = node.outputs[0]
    elif node.op_type == "Sqrt":
        nodes.append(node)
        nxt = _single_consumer(node.outputs[0])
        if nxt is None:
            return None
        if nxt.op_type == "Reciprocal":
            nodes.append(nxt)
            inv = nxt.outputs[0]
        elif nxt.op_type == "Div" and nxt.inputs[0] is x:
            nodes.append(nxt)
            return _with_scale(x, nxt.outputs[0], nodes)
        else:
            return None
    else:
        return None
    mul = _single_consumer(inv)
    if mul is None or mul.op_type != "Mul" or x not in mul.inputs:
        return None
    nodes.append(mul)
    return _with_scale(x, mul.outputs[0], nodes)


def _with_scale(x: ir.Value, normed: ir.Value, nodes: list[ir.Node]) -> Norm:
    mul = _single_consumer(normed)
    if mul is not None and mul.op_type == "Mul":
        other = mul.inputs[1] if mul.inputs[0] is normed else mul.inputs[0]
        if other is not None and other.const_value is not None:
            return Norm("rmsnorm", x, mul.outputs[0], other, None, (*nodes, mul))
    return Norm("rmsnorm", x, normed, None, None, tuple(nodes))
