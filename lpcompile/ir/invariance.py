"""Where an orthogonal transform of the last axis can be folded into the weights around it.

If every value of a set R is replaced by v·Q (Q orthogonal, acting on the last axis), the
graph computes the same function as long as whatever produces a value of R can emit v·Q and
whatever reads one can undo Q, or does not care. This module finds such sets from the graph
alone (no module names) and says, for each, what breaks the invariance.

Two kinds of sets:

**Residual-stream regions** (`find_stream_regions`), seeded at the input of each normalization
and grown over the ops that carry the stream: residual `Add`/`Sub`, data movement that keeps
the last axis (Transpose with the last axis last, Reshape/Flatten/Squeeze/Unsqueeze/Expand with
the last dimension unchanged, Identity, Cast) and linear maps along other axes (Mul/Div by a
tensor broadcast over the last axis, Neg, ReduceSum/ReduceMean over other axes, MatMul reading
the value as its right operand). At its edges a region has

- *producers*, which can emit v·Q: linear layers (W ← W·Q, b ← b·Q), embedding tables
  (E ← E·Q), constants added into the stream, and graph inputs (*entries*: an online transform);
- *normalizations*: RMSNorm commutes with Q (‖xQ‖ = ‖x‖); LayerNorm does once its mean
  subtraction is absorbed into the producers (every producer emits zero-mean rows, W ← W·C with
  C = I − 11ᵀ/d, so LayerNorm without affine equals RMSNorm); the norm's affine (γ, β) is
  removed and absorbed by whatever reads the normalized value;
- *consumers*: linear layers reading the stream or a normalized value (W ← Qᵀ·diag(γ)·W,
  b ← b + β·W); anything else reading a normalized value (or a graph output) is an *exit*,
  an online Qᵀ followed by the affine.

What breaks a region is recorded in `StreamRegion.problems`, e.g. a post-norm residual
(`LayerNorm(x + f(x))` as in BERT: the norm's affine output is itself added into the stream,
so it can be absorbed by no consumer), an element-wise op on the stream (a per-channel Mul,
a non-linearity), a norm over another axis, or a LayerNorm region read by a linear directly
(its producers' outputs would no longer be zero-mean).

**Linear-to-linear chains** (`find_chains`): a linear layer whose output reaches only linear
layers' inputs through data movement and linear maps along other axes, e.g. the value
projection → attention (probabilities · V) → head merge → output projection. A block-diagonal
rotation diag(R, ..., R) with a block that divides every last dimension on the way (the head
size) folds into both ends: per-head rotation of the V/O pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import onnx_ir as ir

from lpcompile.ir.patterns import LinearLayer, Norm, find_linear_layers, find_norms

__all__ = [
    "DATA_MOVEMENT",
    "Producer",
    "Consumer",
    "Exit",
    "StreamRegion",
    "Chain",
    "find_stream_regions",
    "find_chains",
    "last_dim",
]

# Ops that move elements without combining them and keep each last-axis row whole (given the
# checks in `_keeps_rows`): a rotation of the last axis commutes with them, and so does an affine
# map of the last axis (x·γ + β).
DATA_MOVEMENT = frozenset({"Identity", "Cast", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand"})
_SHAPE_ONLY = frozenset({"Shape", "Size"})
_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})


def last_dim(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None or len(value.shape) == 0:
        return None
    d = value.shape[-1]
    return d if isinstance(d, int) else None


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _const_ints(value: ir.Value | None) -> list[int] | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else [int(a) for a in tensor.numpy().reshape(-1)]


def _keeps_rows(node: ir.Node, value: ir.Value, block: int) -> str | None:
    """Why the data-movement `node` (reading `value` as its data input) does not keep every
    aligned group of `block` elements of the last axis together, or None when it does."""
    if not _default_domain(node) or node.op_type not in DATA_MOVEMENT:
        return f"{node.op_type} is not data movement"
    out = node.outputs[0]
    if node.op_type == "Cast":
        to = node.attributes.get("to")
        if to is None or ir.DataType(to.as_int()) not in _FLOATS:
            return "Cast to a non-float type"
        return None
    if node.op_type == "Identity":
        return None
    if node.op_type == "Transpose":
        perm = node.attributes.get("perm")
        rank = _rank(value)
        if perm is None or rank is None or list(perm.as_ints())[-1] != rank - 1:
            return "Transpose moves the last axis"
    d_in, d_out = last_dim(value), last_dim(out)
    if d_in is None or d_out is None:
        return f"{node.op_type} output {out.name} has no static last dimension"
    if d_in % block or d_out % block:
        return f"{node.op_type} changes the last dimension {d_in} -> {d_out}"
    return None


def _stream_move(node: ir.Node, value: ir.Value, dim: int) -> str | None:
    """Why data-movement `node` does not carry stream rows of `dim` whole, or None."""
    why = _keeps_rows(node, value, dim)
    if why is None and node.op_type not in ("Identity", "Cast") and (
            last_dim(value) != dim or last_dim(node.outputs[0]) != dim):
        why = f"{node.op_type} changes the last dimension"
    return why


def _label(node: ir.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else node.op_type)


def _linear_along_other_axes(node: ir.Node, idx: int, value: ir.Value) -> str | None:
    """Why `node` reading `value` at input `idx` is not a linear map that leaves the last
    axis alone (so that it commutes with any transform of the last axis), or None."""
    if not _default_domain(node):
        return f"{node.domain}::{node.op_type} is a custom op"
    op = node.op_type
    if op == "Neg":
        return None
    if op in ("Mul", "Div"):
        if op == "Div" and idx != 0:
            return "Div by the value"
        other = node.inputs[1 - idx]
        if other is None:
            return f"{op} without a second input"
        if other.const_value is not None and other.const_value.size == 1:
            return None
        if last_dim(other) == 1 or (other.shape is not None and len(other.shape) == 0):
            return None
        return f"{op} by {other.name}, which varies along the last axis (a per-channel scale)"
    if op in ("ReduceSum", "ReduceMean"):
        rank = _rank(value)
        axes = _const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
        if axes is None and node.attributes.get("axes") is not None:
            axes = list(node.attributes["axes"].as_ints())
        if rank is None or not axes:
            return f"{op} over all axes (or axes not constant)"
        if (rank - 1) in [a % rank for a in axes]:
            return f"{op} over the last axis"
        return None
    if op == "MatMul":
        if idx == 1 and value.shape is not None and len(value.shape) >= 2:
            return None
        return "MatMul contracts the last axis"
    return f"{op} does not commute with a rotation of the last axis"


# --- residual-stream regions ------------------------------------------------------------------


@dataclass
class Producer:
    kind: str  # "linear" | "embedding" | "constant" | "entry"
    value: ir.Value
    layer: LinearLayer | None = None


@dataclass
class Consumer:
    layer: LinearLayer
    norm: Norm | None  # the normalization whose affine the layer absorbs (None: reads the stream)


@dataclass
class Exit:
    value: ir.Value
    node: ir.Node | None  # None: the value is a graph output
    index: int
    norm: Norm | None  # the normalization whose affine is restored after un-rotating


@dataclass
class StreamRegion:
    dim: int
    values: list[ir.Value] = field(default_factory=list)
    norms: list[Norm] = field(default_factory=list)
    producers: list[Producer] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    exits: list[Exit] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def centered(self) -> bool:
        """LayerNorm regions: producers must emit zero-mean rows."""
        return any(n.kind == "layernorm" for n in self.norms)

    def layers(self) -> list[LinearLayer]:
        return [p.layer for p in self.producers if p.layer is not None] + [c.layer for c in self.consumers]


def norm_has_affine(norm: Norm) -> bool:
    return norm.scale is not None or norm.bias is not None


def _norm_problem(norm: Norm) -> str | None:
    """Why `norm` cannot be part of a rotated region (axis, non-constant affine, used stats)."""
    node = norm.nodes[0]
    name = norm.nodes[-1].name or norm.output.name
    rank = _rank(norm.input)
    if node.op_type in ("LayerNormalization", "RMSNormalization"):
        axis = node.attributes.get("axis")
        a = -1 if axis is None else axis.as_int()
        if not (a == -1 or (rank is not None and a == rank - 1)):
            return f"{name} normalizes over axes {a}.. rather than the last axis only"
        if any(o is not None and (list(o.uses()) or o.is_graph_output()) for o in node.outputs[1:]):
            return f"{name}: its mean / inverse std-dev outputs are used"
    else:
        reduce = next(n for n in norm.nodes if n.op_type == "ReduceMean")
        axes = _const_ints(reduce.inputs[1]) if len(reduce.inputs) > 1 else None
        if axes is None and reduce.attributes.get("axes") is not None:
            axes = list(reduce.attributes["axes"].as_ints())
        if axes != [-1] and (rank is None or axes is None or [a % rank for a in axes] != [rank - 1]):
            return f"{name} takes the mean of squares over axes {axes} rather than the last axis only"
    for v, what in ((norm.scale, "scale"), (norm.bias, "bias")):
        if v is not None and (v.const_value is None or len(v.const_value.shape) > 1
                              or v.const_value.size not in (1, last_dim(norm.input) or v.const_value.size)):
            return f"{name}: its {what} is not a constant vector over the last axis"
    return None


class _Index:
    def __init__(self, graph: ir.Graph):
        self.layers = find_linear_layers(graph, convs=False)  # a conv reads channels on axis 1: not foldable here
        self.norms = find_norms(graph)
        self.by_output = {id(l.output): l for l in self.layers}
        self.by_node = {id(l.node): l for l in self.layers}
        self.norm_of_node = {id(node): n for n in self.norms for node in n.nodes}
        self.norm_by_output = {id(n.output): n for n in self.norms}

    def normed_by(self, value: ir.Value) -> Norm | None:
        """The normalization (with an affine) whose output reaches `value` through data
        movement only, else None."""
        v = value
        while True:
            norm = self.norm_by_output.get(id(v))
            if norm is not None:
                return norm if norm_has_affine(norm) else None
            p = v.producer()
            if p is None or p.op_type not in DATA_MOVEMENT or not _default_domain(p):
                return None
            v = p.inputs[0]

    def linear_reading(self, node: ir.Node, idx: int, value: ir.Value) -> LinearLayer | None:
        layer = self.by_node.get(id(node))
        if layer is not None and layer.kind != "embedding" and idx == 0 and layer.activation is value:
            return layer
        return None


def find_stream_regions(graph: ir.Graph) -> list[StreamRegion]:
    """The connected residual-stream regions of `graph`, one per group of normalizations that
    share a stream, each with its producers, consumers, exits and what breaks it."""
    index = _Index(graph)
    assigned: set[int] = set()
    regions = []
    for norm in index.norms:
        if id(norm.input) in assigned:
            continue
        region = _grow(norm, index)
        assigned.update(id(v) for v in region.values)
        regions.append(region)
    return regions


def _grow(seed: Norm, index: _Index) -> StreamRegion:
    dim = last_dim(seed.input)
    if dim is None and seed.scale is not None and seed.scale.const_value is not None:
        dim = int(seed.scale.const_value.size) if seed.scale.const_value.size > 1 else None
    region = StreamRegion(dim=dim or 0)
    if dim is None:
        region.problems.append(f"{seed.input.name}: the normalized dimension is not static (shape inference "
                               f"has not run: see Canonicalize)")
        region.values.append(seed.input)
        return region
    seen: dict[int, ir.Value] = {}
    work: list[ir.Value] = []
    norms_seen: set[int] = set()
    consumers_seen: set[int] = set()
    problems = region.problems

    def add(v: ir.Value | None) -> None:
        if v is not None and id(v) not in seen:
            seen[id(v)] = v
            region.values.append(v)
            work.append(v)

    def add_norm(norm: Norm) -> None:
        if id(norm) in norms_seen:
            return
        norms_seen.add(id(norm))
        region.norms.append(norm)
        if (why := _norm_problem(norm)) is not None:
            problems.append(why)
        add(norm.input)
        add(norm.output)

    add(seed.input)
    while work:
        v = work.pop()
        normed = index.normed_by(v)
        d = last_dim(v)
        if d is not None and d != dim:
            problems.append(f"{v.name} has last dimension {d}, not the stream's {dim}")
            continue
        _visit_producer(v, dim, index, region, add, add_norm)
        for use in list(v.uses()):
            node, idx = use.node, use.idx
            norm = index.norm_of_node.get(id(node))
            if norm is not None and norm.input is v:
                if normed is not None:
                    problems.append(f"{v.name}, the affine output of {_norm_name(normed)}, is normalized again")
                add_norm(norm)
                continue
            if norm is not None or node.op_type in _SHAPE_ONLY:
                continue  # an inner node of the normalization, or an op that reads only the shape
            layer = index.linear_reading(node, idx, v)
            if layer is not None:
                if id(layer.node) not in consumers_seen:
                    consumers_seen.add(id(layer.node))
                    region.consumers.append(Consumer(layer, normed))
                continue
            if _default_domain(node) and node.op_type in ("Add", "Sub"):
                if normed is not None:
                    problems.append(
                        f"post-norm residual: the output of {_norm_name(normed)} feeds {node.op_type} "
                        f"{_label(node)}, so its affine cannot be absorbed by the consumers")
                # the region still grows over the sum, so that it is reported once, whole
                for inp in node.inputs:
                    add(inp)
                add(node.outputs[0])
                continue
            if idx == 0 and _default_domain(node) and node.op_type in DATA_MOVEMENT:
                if _stream_move(node, v, dim) is None:
                    add(node.outputs[0])
                    continue
            elif normed is None and _linear_along_other_axes(node, idx, v) is None:
                add(node.outputs[0])
                continue
            if normed is not None:
                region.exits.append(Exit(v, node, idx, normed))
            else:
                why = _linear_along_other_axes(node, idx, v) if node.op_type not in DATA_MOVEMENT else _stream_move(node, v, dim)
                problems.append(f"{node.op_type} {_label(node)} reads the stream value {v.name}: {why}")
        if v.is_graph_output():
            region.exits.append(Exit(v, None, -1, normed))
    return region


def _norm_name(norm: Norm) -> str:
    node = norm.nodes[-1]
    return f"{norm.kind} {node.name or norm.output.name}"


def _visit_producer(v, dim, index: _Index, region: StreamRegion, add, add_norm) -> None:
    problems = region.problems
    p = v.producer()
    if p is None:
        if v.is_graph_input():
            region.producers.append(Producer("entry", v))
        elif v.const_value is not None:
            if last_dim(v) != dim:
                problems.append(f"constant {v.name} added to the stream has shape {v.shape}, not [..., {dim}]")
            else:
                region.producers.append(Producer("constant", v))
        else:
            problems.append(f"{v.name} has no producer")
        return
    norm = index.norm_by_output.get(id(v))
    if norm is not None:
        add_norm(norm)
        return
    if index.norm_of_node.get(id(p)) is not None:
        problems.append(f"{v.name} is an intermediate of {_norm_name(index.norm_of_node[id(p)])}")
        return
    layer = index.by_output.get(id(v))
    if layer is not None:
        size = layer.in_features if layer.kind == "embedding" else layer.out_features
        if size != dim:
            problems.append(f"{layer.name} writes {size} features into a stream of {dim}")
        else:
            region.producers.append(Producer("embedding" if layer.kind == "embedding" else "linear", v, layer))
        return
    if _default_domain(p) and p.op_type in ("Add", "Sub"):
        for inp in p.inputs:
            add(inp)
        return
    if _default_domain(p) and p.op_type in DATA_MOVEMENT:
        why = _stream_move(p, p.inputs[0], dim)
        if why is None:
            add(p.inputs[0])
            return
    else:
        for i, inp in enumerate(p.inputs):
            if inp is not None and inp.const_value is None and _linear_along_other_axes(p, i, inp) is None \
                    and (p.op_type != "MatMul" or i == 1):
                add(inp)
                return
        why = _linear_along_other_axes(p, 0, p.inputs[0]) if p.inputs else "no inputs"
    problems.append(f"{v.name} is produced by {p.op_type} {_label(p)}: {why}")


# --- linear-to-linear chains ------------------------------------------------------------------


@dataclass
class Chain:
    producer: LinearLayer
    consumers: list[LinearLayer]
    values: list[ir.Value]
    block: int  # gcd of the last dimensions on the way: the largest rotation block that fits
    through_attention: bool  # passed a MatMul as its right operand (probabilities · V)
    problems: list[str]


def find_chains(graph: ir.Graph) -> list[Chain]:
    """For every linear layer (not an embedding), where its output goes if it reaches other
    linear layers' inputs only through data movement and linear maps along other axes."""
    index = _Index(graph)
    chains = []
    for layer in index.layers:
        if layer.kind == "embedding":
            continue
        chains.append(_follow(layer, index))
    return chains


def _follow(producer: LinearLayer, index: _Index) -> Chain:
    chain = Chain(producer, [], [], producer.out_features, False, [])
    seen: set[int] = set()
    work = [producer.output]
    dims = [producer.out_features]
    while work:
        v = work.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        chain.values.append(v)
        d = last_dim(v)
        if d is None:
            chain.problems.append(f"{v.name} has no static last dimension")
            continue
        dims.append(d)
        if v.is_graph_output():
            chain.problems.append(f"{v.name} is a graph output")
        for use in v.uses():
            node, idx = use.node, use.idx
            if node.op_type in _SHAPE_ONLY:
                continue
            layer = index.linear_reading(node, idx, v)
            if layer is not None:
                if layer not in chain.consumers:
                    chain.consumers.append(layer)
                    dims.append(layer.in_features)
                continue
            if idx == 0 and _default_domain(node) and node.op_type in DATA_MOVEMENT:
                why = _keeps_rows(node, v, 1)
                if why is None and node.op_type == "Expand" and last_dim(node.outputs[0]) != d:
                    why = "Expand broadcasts the last axis"
            else:
                why = _linear_along_other_axes(node, idx, v)
                if why is None and node.op_type == "MatMul":
                    chain.through_attention = True
            if why is not None:
                chain.problems.append(f"{node.op_type} {_label(node)} reads {v.name}: {why}")
                continue
            work.append(node.outputs[0])
    chain.block = math.gcd(*dims)
    if not chain.consumers and not chain.problems:
        chain.problems.append("reaches no linear layer")
    return chain
