"""Graph patterns every pass relies on: linear layers and normalizations.

A *linear layer* is a node that multiplies an activation by a constant 2-D weight:
`MatMul(x, W)` (W is [K, N]), `Gemm(x, B)` (B is [K, N], or [N, K] with transB=1) and an
embedding lookup `Gather(table, ids)` on a constant [V, D] table. lpcompile describes every such
weight in one canonical layout, [K (in), N (out)] — for an embedding table that is its transpose
[D, V] — so one QuantSpec (`int4:block(0,128)`) means the same thing for all three;
`LinearLayer.storage_axis` maps a canonical axis onto the axis of the stored tensor.

A *convolution* (`Conv` 1-D/2-D/3-D, grouped and depthwise included; `ConvTranspose` with one
group) on a constant weight is a linear layer too, over its im2col patch: the canonical weight is
[K = (kernel positions) x (input channels per group), N = output channels], with K ordered
kernel position-major and input channel-minor, so a block of input channels at one kernel
position is a contiguous run of K (and one ONNX block along the stored input-channel axis).
For a grouped conv K is per group (each output channel reads only its group's inputs).
`LinearLayer.canonical` / `to_storage` convert between the stored tensor ([Cout, Cin/g, *k]
for Conv, [Cin, Cout, *k] for ConvTranspose) and [K, N]; `conv_weight_spec` fits a weight
spec to what one ONNX DequantizeLinear can express on a conv weight.

Canonicalization writes what it recognised into node metadata (`lpcompile.pattern`), so the
plan travels with a saved model; the finders here recompute it from the graph and never trust
exporter-specific names.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lpcompile.formats import PerBlock, PerChannel, PerTensor, QuantSpec

PATTERN_KEY = "lpcompile.pattern"
LAYER_NAME_KEY = "lpcompile.layer"


@dataclass(frozen=True)
class ConvGeometry:
    """Where a conv weight's canonical [K, N] axes live in the stored tensor."""

    out_axis: int  # 0 for Conv ([Cout, Cin/g, *k]), 1 for ConvTranspose ([Cin, Cout, *k])
    in_axis: int
    kernel: tuple[int, ...]  # spatial kernel shape
    groups: int
    transpose: bool  # ConvTranspose


@dataclass(frozen=True)
class LinearLayer:
    node: ir.Node
    kind: str  # "matmul" | "gemm" | "embedding" | "conv"
    activation: ir.Value | None  # the float input (None for embeddings: their input is indices)
    weight: ir.Value  # the constant weight initializer
    transposed: bool  # stored as [N, K] (Gemm transB=1, embedding tables) rather than [K, N]
    bias: ir.Value | None  # Gemm C, or the constant of a following Add
    output: ir.Value  # the layer's output (after the bias Add where there is one)
    conv: ConvGeometry | None = None  # for kind "conv"

    @property
    def name(self) -> str:
        """A stable, readable name: the weight's module path (`encoder.layer.0.attention.q`)
        where the exporter left one, else the node's name."""
        return layer_name(self.node, self.weight)

    @property
    def in_features(self) -> int:
        shape = self.weight.shape
        if self.conv is not None:
            return int(shape[self.conv.in_axis]) * int(np.prod(self.conv.kernel, dtype=np.int64))
        return int(shape[1] if self.transposed else shape[0])

    @property
    def out_features(self) -> int:
        shape = self.weight.shape
        if self.conv is not None:
            return int(shape[self.conv.out_axis])
        return int(shape[0] if self.transposed else shape[1])

    def storage_axis(self, canonical_axis: int) -> int:
        """The axis of the stored weight that is `canonical_axis` of the [K, N] layout (for a
        conv, K's blocks lie along the stored input-channel axis: see `conv_weight_spec`)."""
        if self.conv is not None:
            return self.conv.out_axis if canonical_axis == 1 else self.conv.in_axis
        return 1 - canonical_axis if self.transposed else canonical_axis

    def canonical(self, stored: np.ndarray) -> np.ndarray:
        """The stored weight as canonical [K, N]."""
        if self.conv is None:
            return stored.T if self.transposed else stored
        c = self.conv
        moved = np.moveaxis(stored, (c.in_axis, c.out_axis), (-2, -1))  # [*k, cin, cout]
        return moved.reshape(-1, moved.shape[-1])

    def to_storage(self, a: np.ndarray) -> np.ndarray:
        """A canonical [K', N'] array (weights, or blocked scales whose K' = K / block) in the
        stored weight's layout: the inverse of `canonical`."""
        if self.conv is None:
            return a.T if self.transposed else a
        c = self.conv
        shaped = a.reshape(*c.kernel, -1, a.shape[-1])
        return np.ascontiguousarray(np.moveaxis(shaped, (-2, -1), (c.in_axis, c.out_axis)))


def conv_weight_spec(layer: LinearLayer, spec: QuantSpec | None) -> tuple[QuantSpec | None, str]:
    """`spec` as one ONNX DequantizeLinear can express it on `layer`'s conv weight, and why it
    changed ("" when it did not). Per tensor and per output channel map as they are; blocks along
    K must divide the input channels per group (a block never straddles two kernel positions):
    the block shrinks to the largest divisor of Cin/g within it, and below 16 channels (the stem,
    depthwise convs) per-output-channel scales are used instead (a scale per 1-8 weights would
    cost more bits than it saves). Per-input-channel scales have no single ONNX axis here."""
    if spec is None or layer.conv is None:
        return spec, ""
    g = spec.granularity
    if isinstance(g, (PerTensor,)) or isinstance(g, PerChannel) and g.axis == 1:
        return spec, ""
    per_channel = QuantSpec(spec.format, PerChannel(1), spec.symmetric, spec.scale_method, spec.scale_format,
                            spec.dynamic)
    if isinstance(g, PerChannel):
        return per_channel, "conv: per-input-channel scales have no single axis on a conv weight; per output channel"
    if isinstance(g, PerBlock) and g.axis == 0:
        cin = int(layer.weight.shape[layer.conv.in_axis])
        size = max(d for d in range(1, min(g.size, cin) + 1) if cin % d == 0)
        if size == g.size:
            return spec, ""
        if size < 16:
            return per_channel, (f"conv: {cin} input channels per group leave no block of >= 16 within "
                                 f"{g.size}; per output channel")
        blocked = QuantSpec(spec.format, PerBlock(0, size), spec.symmetric, spec.scale_method, spec.scale_format,
                            spec.dynamic)
        return blocked, f"conv: blocks of {size} ({cin} input channels per group)"
    return spec, ""


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


def conv_gram_key(layer: LinearLayer) -> str:
    """The calibration-statistics key of a conv's im2col patches (their XᵀX is per layer: two
    convs reading one tensor with other kernels see other patches)."""
    return f"{layer.activation.name}@im2col:{layer.name}"


def conv_patches(layer: LinearLayer, x: np.ndarray) -> np.ndarray | None:
    """The im2col patches of a one-group Conv's input x [N, C, *S] as rows [M, K] in the
    canonical K order (tap-major, channel-minor), so `patches @ layer.canonical(W)` is the conv
    without bias; None for what has no such matrix here (groups, ConvTranspose, auto_pad SAME)."""
    c = layer.conv
    if c is None or c.transpose or c.groups != 1:
        return None
    attrs = layer.node.attributes
    nd = len(c.kernel)

    def ints(key, default):
        a = attrs.get(key)
        return list(a.as_ints()) if a is not None else default

    pad = attrs.get("auto_pad")
    pad = pad.as_string() if pad is not None else "NOTSET"
    if pad not in ("NOTSET", "VALID"):
        return None
    strides, dilations = ints("strides", [1] * nd), ints("dilations", [1] * nd)
    pads = [0] * (2 * nd) if pad == "VALID" else ints("pads", [0] * (2 * nd))
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    xl = np.moveaxis(xp, 1, -1)  # [N, *S', C]
    out = [(xl.shape[1 + i] - dilations[i] * (c.kernel[i] - 1) - 1) // strides[i] + 1 for i in range(nd)]
    taps = []
    for tap in itertools.product(*(range(k) for k in c.kernel)):
        index = tuple(slice(t * d, t * d + (o - 1) * s + 1, s) for t, d, o, s in zip(tap, dilations, out, strides))
        taps.append(xl[(slice(None), *index)])
    return np.concatenate(taps, axis=-1).reshape(-1, layer.in_features)


def find_linear_layers(graph: ir.Graph, convs: bool = True) -> list[LinearLayer]:
    """All linear layers of the main graph, in topological order; convolutions (kind "conv")
    unless `convs` is False (analyses that need a 2-D matmul: rotation, latency models)."""
    layers = []
    for node in graph:
        layer = match_linear(node)
        if layer is not None and (convs or layer.kind != "conv"):
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
    if node.op_type in ("Conv", "ConvTranspose"):
        return _why_not_conv(node)
    return f"{node.op_type} is not a linear op"


def _why_not_conv(node: ir.Node) -> str | None:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if w is None or w.const_value is None or w.is_graph_input():
        return f"{node.op_type} weight is not a constant"
    t = w.const_value
    if len(t.shape) < 3 or t.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16,
                                           ir.DataType.DOUBLE):
        return f"{node.op_type} weight is not a float tensor of rank >= 3"
    group = node.attributes.get("group")
    if node.op_type == "ConvTranspose" and group is not None and group.as_int() != 1:
        return "grouped ConvTranspose (its weight's output-channel axis is per group)"
    return None


def _build(node: ir.Node) -> LinearLayer:
    if node.op_type in ("Conv", "ConvTranspose"):
        shape = tuple(int(d) for d in node.inputs[1].shape)
        group = node.attributes.get("group")
        transpose = node.op_type == "ConvTranspose"
        geometry = ConvGeometry(1 if transpose else 0, 0 if transpose else 1, shape[2:],
                                group.as_int() if group is not None else 1, transpose)
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        return LinearLayer(node, "conv", node.inputs[0], node.inputs[1], False, bias, node.outputs[0], geometry)
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
