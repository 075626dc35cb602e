"""rotate: Hadamard rotations that spread activation outliers over all channels without changing
the function, because x·W = (x·Q)·(Qᵀ·W) for an orthogonal Q.

Three kinds of site, found from the graph (`lpcompile.ir.invariance`), never from module names:

- **stream regions** (folded, no runtime cost): the residual stream between normalizations is
  rotated once. Embedding tables and every linear writing into the stream get Q on their output
  side, every linear reading a normalized value gets Qᵀ on its input side with the norm's affine
  folded in (RMSNorm scales; LayerNorm's γ and β, after its mean subtraction is absorbed into the
  producers, which then emit zero-mean rows, so the LayerNorm becomes an RMSNorm). Graph inputs
  entering the stream and normalized values leaving it (to a graph output or a non-linear op) get
  an online transform: the only runtime cost. Regions where any op breaks the invariance are left
  alone, with the reason.
- **chains** (folded): a linear whose output reaches only linear inputs through data movement and
  attention's probabilities·V, i.e. the value/output projection pair: a per-head rotation
  diag(R, ..., R) folded into both.
- **online** (runtime): `ai.lpcompile::Hadamard` before a linear's input, Qᵀ folded into its
  weight. Always valid ("Training Transformers with 4-bit Integers").
- **cross-head** (runtime, option `cross_head`): after a chain through attention is folded per
  head (block b), the consumer (the attention output projection) also gets X = H_h ⊗ I_b online
  across its h = in_features / b heads, Xᵀ folded into its weight, so its input is rotated by
  H_h ⊗ H_b as a whole, not head by head (QuaRot's online Hadamard before o_proj).

Modes: `online` rotates every linear input online; `fold` folds regions and chains and adds
online transforms only where folding is impossible (inputs of linears that write into a folded
stream but read something else, e.g. the MLP down projection after its non-linearity);
`auto` is `fold` plus an online transform for every linear input nothing else rotated.

Results: `model.meta["lpcompile.rotate"]` (sites, how each was rotated or why not, counters),
node metadata `lpcompile.rotation` (JSON) on every rotated linear, normalization and Hadamard node.
Preserves: semantics up to fp rounding.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir

from lpcompile.errors import PassError
from lpcompile.ir import DOMAIN
from lpcompile.ir.hadamard import (
    HADAMARD_OP,
    apply_hadamard,
    construction,
    hadamard,
    hadamard_function,
    has_hadamard,
    kron_factors,
    largest_block,
    random_signs,
)
from lpcompile.ir.invariance import Chain, Exit, StreamRegion, find_chains, find_stream_regions, last_dim
from lpcompile.ir.patterns import LAYER_NAME_KEY, LinearLayer, Norm, find_linear_layers, match_linear
from lpcompile.ir.store import new_tensor, read_weight

log = logging.getLogger(__name__)

ROTATION_KEY = "lpcompile.rotation"
REPORT_KEY = "lpcompile.rotate"
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


@dataclass(frozen=True)
class Rotation:
    """Q = diag(signs) · diag(H_b, ..., H_b) on a last axis of `dim` (H_b = `hadamard(block)`)."""

    dim: int
    block: int
    signs: np.ndarray | None = None

    def right(self, w: np.ndarray) -> np.ndarray:
        """w · Q over the last axis."""
        if self.signs is not None:
            w = w * self.signs
        return apply_hadamard(w, self.block)

    def left_t(self, w: np.ndarray) -> np.ndarray:
        """Qᵀ · w over the first axis (w is [dim, N])."""
        return self.right(w.T).T

    def describe(self) -> str:
        factors = " ⊗ ".join(f"{kind}({order})" for kind, order in construction(self.block) or ())
        blocks = "" if self.block == self.dim else f"{self.dim // self.block} blocks of "
        return f"{blocks}H{self.block} = {factors}" + (" with random signs" if self.signs is not None else "")


@dataclass
class _Edit:
    """What happens to one linear layer's weight, applied once at the end of the pass."""

    node: ir.Node
    gamma: np.ndarray | None = None  # norm scale absorbed on the input side
    beta: np.ndarray | None = None  # norm bias absorbed into the layer's bias
    q_in: Rotation | None = None  # W ← Qᵀ W
    m_out: Rotation | None = None  # W ← W (C) Q, b ← b (C) Q
    cross: tuple[int, int] | None = None  # (heads h, block b): W ← Xᵀ W after q_in, X = H_h ⊗ I_b
    center_out: bool = False  # C = I − 11ᵀ/d: the layer's outputs made zero-mean
    tags: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Rotate(ir.passes.InPlacePass):
    """Rotate linear inputs by orthogonal Hadamard transforms: folded into the weights where the
    graph proves a region rotation-invariant, online (`ai.lpcompile::Hadamard`) elsewhere.

    mode: "auto" | "fold" | "online" (module docstring). block_size: the largest block of an
    online transform (None: the whole dimension where a Hadamard matrix of that order is
    constructible, else the largest constructible block that divides it); folded rotations
    always use the whole dimension. seed: random ±1 sign flips before each Hadamard, drawn from
    this seed (the randomized Hadamard of QuaRot); None: plain Hadamard, whose first column is
    constant, so a row's mean (e.g. a LayerNorm's β) all lands in one coefficient, a new outlier
    (measured on MiniLM W4A4: 0.937 plain vs 0.959 randomized). min_block: a transform with a smaller block is not worth it (the site is
    skipped, with the reason). data (optional, a `CalibrationData`): measure every linear
    input's kurtosis and max/median channel ratio before and after, into the report.
    cross_head: after folding a V/O chain through attention, an online Hadamard across the heads
    of the output projection's input (module docstring).
    """

    mode: Literal["auto", "online", "fold"] = "auto"
    block_size: int | None = None
    seed: int | None = 0
    min_block: int = 16
    data: object | None = None
    batch_size: int = 8
    cross_head: bool = False

    def __post_init__(self):
        if self.mode not in ("auto", "online", "fold"):
            raise PassError(f"Rotate: unknown mode {self.mode!r}; choose auto, online or fold")
        if self.block_size is not None and self.block_size < 1:
            raise PassError(f"Rotate: block_size must be >= 1, got {self.block_size}")
        if self.min_block < 1:
            raise PassError(f"Rotate: min_block must be >= 1, got {self.min_block}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = outlier_stats(model, self.data, self.batch_size) if self.data is not None else None
        run = _Run(model, self)
        if self.mode != "online":
            for region in find_stream_regions(model.graph):
                run.region(region)
            for chain in find_chains(model.graph):
                run.chain(chain)
        run.online()
        run.finish()
        report = run.report
        if before is not None:
            after = outlier_stats(model, self.data, self.batch_size)
            report["outliers"] = {name: {"before": before[name], "after": after.get(name)} for name in before}
        model.meta[REPORT_KEY] = report
        log.info("rotate: %s", report["counters"])
        return ir.passes.PassResult(model, modified=run.modified)


class _Run:
    """The state of one application of `Rotate` to one model."""

    def __init__(self, model: ir.Model, config: Rotate):
        self.model = model
        self.graph = model.graph
        self.config = config
        self.rng = np.random.default_rng(config.seed) if config.seed is not None else None
        self.edits: dict[int, _Edit] = {}
        self.fold_producers: set[int] = set()  # linears writing into a folded stream
        self.constants: dict[tuple, ir.Value] = {}
        self.replaced: set[str] = set()
        self.modified = False
        self.counters: Counter[str] = Counter()
        self.report: dict = {"mode": config.mode, "seed": config.seed, "regions": [], "chains": [], "online": [],
                             "counters": self.counters}
        self.opset = self.graph.opset_imports.get("", model.opset_imports.get("", 0))
        # names in use (nodes and values), so that what this run adds never collides, even on a
        # model that was rotated, saved and loaded again
        self.names: set[str] = {n.name for n in self.graph if n.name}
        self.names.update(v.name for v in self.graph.inputs if v.name)
        self.names.update(self.graph.initializers)
        self.names.update(o.name for n in self.graph for o in n.outputs if o.name)

    # --- stream regions ---------------------------------------------------------------------------

    def check_region(self, region: StreamRegion) -> str | None:
        """Why `region` is not folded, or None."""
        rotated = [c.layer.name for c in region.consumers if "input" in _tag(c.layer.node)]
        rotated += [p.layer.name for p in region.producers if p.layer is not None and "output" in _tag(p.layer.node)]
        if rotated:
            return f"already rotated ({rotated[0]})"
        if region.problems:
            more = f" (and {len(region.problems) - 1} more)" if len(region.problems) > 1 else ""
            return region.problems[0] + more
        kinds = {n.kind for n in region.norms}
        if len(kinds) > 1:
            return "the region mixes LayerNorm and RMSNorm"
        if region.centered:
            direct = [c.layer.name for c in region.consumers if c.norm is None]
            if direct:
                return (f"{direct[0]} reads the stream directly, but the region's LayerNorms need its producers "
                        f"made zero-mean")
            out = [e.value.name for e in region.exits if e.norm is None]
            if out:
                return (f"stream value {out[0]} leaves the region un-normalized, but the region's LayerNorms need "
                        f"its producers made zero-mean")
        if not region.consumers:
            return "no linear layer reads the region"
        if largest_block(region.dim) < self.config.min_block:
            return f"no Hadamard block >= {self.config.min_block} divides the stream dimension {region.dim}"
        online = [p for p in region.producers if p.kind == "entry"] + region.exits
        if online and self.opset < 15:
            return f"entries/exits need the online op, which needs opset >= 15 (model: {self.opset})"
        return None

    def region(self, region: StreamRegion) -> None:
        name = f"stream{len(self.report['regions'])}"
        entry = {
            "name": name, "dim": region.dim, "norms": [_norm_label(n) for n in region.norms],
            "producers": [_producer_label(p) for p in region.producers],
            "consumers": [c.layer.name for c in region.consumers],
        }
        self.report["regions"].append(entry)
        reason = self.check_region(region)
        if reason is not None:
            entry.update(status="already rotated" if reason.startswith("already") else "skipped", reason=reason)
            self.counters["regions_already" if reason.startswith("already") else "regions_skipped"] += 1
            log.info("rotate: %s not folded: %s", name, reason)
            return
        dim = region.dim
        rot = self._rotation(dim, largest_block(dim))
        centered = region.centered
        entry.update(status="folded", rotation=rot.describe(), centered=centered,
                     entries=[], exits=[])
        for ex in region.exits:
            entry["exits"].append(self._exit(ex, rot, name))
        for p in region.producers:
            if p.kind == "entry":
                entry["entries"].append(self._entry(p.value, rot, centered, name))
            elif p.kind == "constant":
                self._replace_constant(p.value, rot, centered)
            else:
                edit = self._edit(p.layer.node)
                if edit.m_out is not None:
                    raise PassError(f"rotate: {p.layer.name} is written into two rotations")
                edit.m_out, edit.center_out = rot, centered
                edit.tags["output"] = name
                self.fold_producers.add(id(p.layer.node))
        for c in region.consumers:
            edit = self._edit(c.layer.node)
            if edit.q_in is not None:
                raise PassError(f"rotate: {c.layer.name} reads two rotations")
            edit.q_in = rot
            edit.tags["input"] = name
            if c.norm is not None:
                edit.gamma = _vector(c.norm.scale, dim)
                edit.beta = _vector(c.norm.bias, dim)
        for norm in region.norms:
            self._strip_norm(norm, name)
        self.counters["regions_folded"] += 1
        self.modified = True
        log.info("rotate: %s folded (%d norms, %d producers, %d consumers, %d online)", name, len(region.norms),
                 len(region.producers), len(region.consumers), len(entry["entries"]) + len(entry["exits"]))

    def _entry(self, x: ir.Value, rot: Rotation, centered: bool, region: str) -> str:
        """A graph input entering the stream: (x − mean(x)) · Q online."""
        uses = [(u.node, u.idx) for u in x.uses()]
        v = x
        if centered:
            mean = self._node("ReduceMean", [x] + ([self._ints([-1])] if self.opset >= 18 else []),
                              {"keepdims": 1} | ({} if self.opset >= 18 else {"axes": [-1]}), like=x, shape=None)
            v = self._node("Sub", [x, mean], like=x)
            v.producer().metadata_props[ROTATION_KEY] = json.dumps({"entry": region, "center": True})
        y = self._transform(v, rot, inverse=False, tag={"entry": region})
        for node, idx in uses:
            node.replace_input_with(idx, y)
        return x.name

    def _exit(self, ex: Exit, rot: Rotation, region: str) -> str:
        """A value leaving the region: · Qᵀ online, then the norm's affine."""
        y = self._transform(ex.value, rot, inverse=True, tag={"exit": region})
        if ex.norm is not None:
            if ex.norm.scale is not None:
                y = self._node("Mul", [y, ex.norm.scale], like=ex.value)
            if ex.norm.bias is not None:
                y = self._node("Add", [y, ex.norm.bias], like=ex.value)
        if ex.node is None:
            _replace_graph_output(self.graph, ex.value, y, self._fresh)
            return f"{y.name} (graph output)"
        ex.node.replace_input_with(ex.index, y)
        return f"{ex.value.name} -> {ex.node.op_type} {ex.node.name}"

    def _replace_constant(self, value: ir.Value, rot: Rotation, centered: bool) -> None:
        c = value.const_value.numpy()
        arr = c.astype(np.float64)
        if centered:
            arr = arr - arr.mean(axis=-1, keepdims=True)
        new = self._initializer(f"{value.name}_rotated", rot.right(arr).astype(c.dtype))
        for use in list(value.uses()):
            use.node.replace_input_with(use.idx, new)
        self.replaced.add(value.name)

    def _strip_norm(self, norm: Norm, region: str) -> None:
        """Remove the affine (absorbed by the consumers); LayerNorm → RMSNorm (its input is
        zero-mean now, and RMSNorm commutes with the rotation)."""
        last = norm.nodes[-1]
        tag = json.dumps({"region": region, "affine": "absorbed" if norm.scale is not None or norm.bias is not None
                          else "none"})
        if last.op_type == "LayerNormalization":
            eps = last.attributes.get("epsilon")
            y = self._rms(last.inputs[0], eps.as_float() if eps is not None else 1e-5)  # may be an entry's output now
            y.producer().metadata_props[ROTATION_KEY] = json.dumps(
                {"region": region, "replaces": "LayerNormalization", "affine": "absorbed"})
            _replace_uses(self.graph, last.outputs[0], y, self._fresh)
            self.graph.remove(last, safe=True)
            return
        if last.op_type == "RMSNormalization":
            if norm.scale is not None:
                ones = self._initializer(f"{norm.scale.name}_ones", np.ones_like(norm.scale.const_value.numpy()))
                last.replace_input_with(1, ones)
            last.metadata_props[ROTATION_KEY] = tag
            return
        if norm.scale is not None:  # decomposed: ... → Mul(x, rsqrt) → Mul(·, γ)
            normed = last.inputs[0] if last.inputs[1] is norm.scale else last.inputs[1]
            _replace_uses(self.graph, last.outputs[0], normed, self._fresh)
            self.graph.remove(last, safe=True)
            normed.producer().metadata_props[ROTATION_KEY] = tag
        else:
            last.metadata_props[ROTATION_KEY] = tag

    def _rms(self, x: ir.Value, eps: float) -> ir.Value:
        dtype = (x.dtype or ir.DataType.FLOAT).numpy()
        sq = self._node("Mul", [x, x], like=x)
        axes = [self._ints([-1])] if self.opset >= 18 else []
        attrs = {"keepdims": 1} | ({} if self.opset >= 18 else {"axes": [-1]})
        ms = self._node("ReduceMean", [sq, *axes], attrs, like=x, shape=None)
        eps_v = self._initializer("rotate_rms_eps", np.array(eps, dtype=dtype))
        inv = self._node("Reciprocal", [self._node("Sqrt", [self._node("Add", [ms, eps_v], like=ms, shape=None)],
                                                   like=ms, shape=None)], like=ms, shape=None)
        return self._node("Mul", [x, inv], like=x)

    # --- chains (V/O per head) -------------------------------------------------------------------

    def check_chain(self, chain: Chain, block: int) -> str | None:
        if "output" in _tag(chain.producer.node) or any("input" in _tag(c.node) for c in chain.consumers):
            return "already rotated"
        if chain.problems:
            return chain.problems[0]
        if id(chain.producer.node) in self.edits and self.edits[id(chain.producer.node)].m_out is not None:
            return f"{chain.producer.name} already writes into a rotated region"
        for c in chain.consumers:
            if id(c.node) in self.edits and self.edits[id(c.node)].q_in is not None:
                return f"{c.name} already reads a rotated region"
        if block < self.config.min_block:
            return f"no Hadamard block >= {self.config.min_block} divides every last dimension on the way (gcd {chain.block})"
        return None

    def chain(self, chain: Chain) -> None:
        block = largest_block(chain.block)
        reason = self.check_chain(chain, block)
        if reason is not None and not chain.through_attention:
            log.debug("rotate: no chain from %s: %s", chain.producer.name, reason)
            return
        name = f"chain{len(self.report['chains'])}"
        entry = {"name": name, "producer": chain.producer.name, "consumers": [c.name for c in chain.consumers],
                 "through_attention": chain.through_attention}
        self.report["chains"].append(entry)
        if reason is not None:
            entry.update(status="already rotated" if reason == "already rotated" else "skipped", reason=reason)
            self.counters["chains_already" if reason == "already rotated" else "chains_skipped"] += 1
            log.info("rotate: %s (%s) not folded: %s", name, chain.producer.name, reason)
            return
        signs = random_signs(block, self.rng) if self.rng is not None else None
        out = Rotation(chain.producer.out_features, block, None if signs is None else np.tile(
            signs, chain.producer.out_features // block))
        edit = self._edit(chain.producer.node)
        edit.m_out, edit.tags["output"] = out, f"{name}:block{block}"
        for c in chain.consumers:
            rot = Rotation(c.in_features, block, None if signs is None else np.tile(signs, c.in_features // block))
            edit = self._edit(c.node)
            edit.q_in, edit.tags["input"] = rot, f"{name}:block{block}"
        entry.update(status="folded", block=block, rotation=out.describe())
        self.counters["chains_folded"] += 1
        self.modified = True
        if self.config.cross_head and chain.through_attention:
            entry["cross_head"] = [self._cross_head(c, block, name) for c in chain.consumers]

    def _cross_head(self, layer: LinearLayer, block: int, chain: str) -> dict:
        """x ← x · (H_h ⊗ I_b) online before `layer` (its input already rotated per head by the
        chain), Xᵀ into its weight."""
        heads = layer.in_features // block
        entry = {"layer": layer.name, "heads": heads, "block": block}
        x = layer.activation
        if heads < 2 or layer.in_features % block or not has_hadamard(heads):
            reason = f"no Hadamard matrix of order {heads} (= {layer.in_features} / {block}) is constructible here"
            entry.update(status="skipped", reason="a single head" if heads < 2 else reason)
            self.counters["cross_head_skipped"] += 1
            return entry
        if x is None or last_dim(x) not in (None, layer.in_features) or self.opset < 15:
            entry.update(status="skipped", reason="the input is not a rotatable float value (or opset < 15)")
            self.counters["cross_head_skipped"] += 1
            return entry
        hadamard_function(self.model)
        dtype = (x.dtype or ir.DataType.FLOAT).numpy()
        a = self._initializer(f"hadamard_heads{heads}_a", hadamard(heads).astype(dtype), reuse=True)
        s = self._initializer(f"hadamard_heads{heads}_identity{block}", np.eye(block, dtype=dtype), reuse=True)
        y = self._node(HADAMARD_OP, [x, a, s], like=x, domain=DOMAIN)
        info = {"cross_head": layer.name, "heads": heads, "block": block, "chain": chain}
        y.producer().metadata_props[ROTATION_KEY] = json.dumps(info)
        layer.node.replace_input_with(0, y)
        edit = self._edit(layer.node)
        edit.cross = (heads, block)
        edit.tags["input"] = f"{edit.tags.get('input', chain)}+cross_head:H{heads}xI{block}"
        entry.update(status="online", rotation=f"H{heads} ⊗ I{block} = "
                     + " ⊗ ".join(f"{k}({o})" for k, o in construction(heads)) + f" ⊗ I({block})")
        self.counters["cross_head_online"] += 1
        return entry

    # --- online ----------------------------------------------------------------------------------

    def online_candidates(self) -> list[LinearLayer]:
        layers = [l for l in find_linear_layers(self.graph, convs=False) if l.kind != "embedding" and l.activation is not None]
        # not rotated by this run, nor by an earlier one (those were reported with their region)
        free = [l for l in layers if "input" not in _tag(l.node)
                and not (id(l.node) in self.edits and self.edits[id(l.node)].q_in is not None)]
        if self.config.mode == "fold":
            return [l for l in free if id(l.node) in self.fold_producers]
        return free

    def check_online(self, x: ir.Value, layers: list[LinearLayer]) -> tuple[str | None, int]:
        if any("input" in _tag(l.node) for l in layers):
            return "already rotated", 0
        n = layers[0].in_features
        if x.dtype is not None and x.dtype not in _FLOATS:
            return f"the input {x.name} is {x.dtype}, not a float", 0
        d = last_dim(x)
        if d is not None and d != n:
            return f"the input's last dimension {d} is not in_features={n}", 0
        block = largest_block(n, self.config.block_size)
        if block < self.config.min_block:
            return f"no Hadamard block >= {self.config.min_block} divides in_features={n} (largest {block})", block
        if self.opset < 15:
            return f"the online op needs opset >= 15 (model: {self.opset})", block
        return None, block

    def online(self) -> None:
        groups: dict[int, list[LinearLayer]] = {}
        values: dict[int, ir.Value] = {}
        for layer in self.online_candidates():
            groups.setdefault(id(layer.activation), []).append(layer)
            values[id(layer.activation)] = layer.activation
        for key, layers in groups.items():
            x = values[key]
            reason, block = self.check_online(x, layers)
            entry = {"input": x.name, "layers": [l.name for l in layers], "block": block}
            self.report["online"].append(entry)
            if reason is not None:
                entry.update(status="already rotated" if reason == "already rotated" else "skipped", reason=reason)
                self.counters["online_already" if reason == "already rotated" else "online_skipped"] += 1
                if reason != "already rotated":
                    log.info("rotate: no online transform before %s: %s", entry["layers"], reason)
                continue
            n = layers[0].in_features
            rot = self._rotation(n, block)
            y = self._transform(x, rot, inverse=False, tag={"online": [l.name for l in layers]})
            for layer in layers:
                layer.node.replace_input_with(0, y)
                edit = self._edit(layer.node)
                edit.q_in, edit.tags["input"] = rot, f"online:block{block}"
            entry.update(status="online", rotation=rot.describe())
            self.counters["online"] += 1
            self.modified = True

    # --- weights ---------------------------------------------------------------------------------

    def finish(self) -> None:
        for edit in self.edits.values():
            self._apply(edit)
        for name in self.replaced:
            value = self.graph.initializers.get(name)
            if value is not None and not list(value.uses()) and not value.is_graph_output():
                del self.graph.initializers[name]
        if self.modified:
            self.graph.sort()

    def _apply(self, edit: _Edit) -> None:
        layer = match_linear(edit.node)
        if layer is None:
            raise PassError(f"rotate: {edit.node.name} is no longer a linear layer")
        widx = 0 if layer.kind == "embedding" else 1
        stored = layer.weight.const_value
        w = read_weight(stored, np.float64)  # a copy; an external weight is unmapped again
        if layer.kind == "embedding":  # [V, D]: rows are written into the stream
            if edit.center_out:
                w = w - w.mean(axis=-1, keepdims=True)
            w = edit.m_out.right(w)
            self._set_weight(layer, widx, w.astype(stored.dtype.numpy()))
            edit.node.metadata_props[ROTATION_KEY] = json.dumps(edit.tags, sort_keys=True)
            return
        w = w.T if layer.transposed else w  # canonical [K, N]
        bias = layer.bias.const_value.numpy().astype(np.float64) if layer.bias is not None else None
        alpha, beta_g = _gemm_scales(layer)
        extra = None
        if edit.beta is not None:
            extra = (edit.beta @ w) * (alpha / beta_g)
        if edit.gamma is not None:
            w = edit.gamma[:, None] * w
        if extra is not None:
            bias = extra if bias is None else bias + extra
        if edit.q_in is not None:
            w = edit.q_in.left_t(w)
        if edit.cross is not None:  # (Xᵀ W)[(h, j), n] = Σ_g H[g, h] W[(g, j), n]
            heads, block = edit.cross
            w = np.einsum("gh,gjn->hjn", hadamard(heads), w.reshape(heads, block, -1)).reshape(w.shape)
        if edit.m_out is not None:
            if edit.center_out:
                w = w - w.mean(axis=-1, keepdims=True)
                bias = None if bias is None else bias - bias.mean(axis=-1, keepdims=True)
            w = edit.m_out.right(w)
            if bias is not None:
                n = w.shape[1]
                bias = edit.m_out.right(np.broadcast_to(bias, bias.shape[:-1] + (n,)) if bias.ndim else np.full(n, bias))
        out = w.T if layer.transposed else w
        self._set_weight(layer, widx, out.astype(stored.dtype.numpy()))
        if bias is not None:
            self._set_bias(layer, bias.astype(stored.dtype.numpy()))
        edit.node.metadata_props[ROTATION_KEY] = json.dumps(edit.tags, sort_keys=True)

    def _set_weight(self, layer: LinearLayer, widx: int, array: np.ndarray) -> None:
        old = layer.node.inputs[widx]
        new = self._initializer(f"{old.name}_rotated", array)
        layer.node.replace_input_with(widx, new)
        self.replaced.add(old.name)

    def _set_bias(self, layer: LinearLayer, array: np.ndarray) -> None:
        if layer.bias is not None:
            new = self._initializer(f"{layer.bias.name}_rotated", array)
            self.replaced.add(layer.bias.name)
            if layer.kind == "gemm":
                layer.node.replace_input_with(2, new)
            else:
                add = next(u.node for u in layer.node.outputs[0].uses())
                add.replace_input_with(1 if add.inputs[1] is layer.bias else 0, new)
            return
        new = self._initializer(f"{layer.name}.bias_rotated", array)
        if layer.kind == "gemm":
            layer.node.resize_inputs(3)
            layer.node.replace_input_with(2, new)
            return
        out = layer.node.outputs[0]
        uses = [(u.node, u.idx) for u in out.uses()]
        y = self._node("Add", [out, new], like=out)
        for node, idx in uses:
            node.replace_input_with(idx, y)
        if out.is_graph_output():
            _replace_graph_output(self.graph, out, y, self._fresh)

    # --- building blocks -------------------------------------------------------------------------

    def _edit(self, node: ir.Node) -> _Edit:
        if id(node) not in self.edits:
            layer = match_linear(node)
            if layer is not None:  # the layer's name stays what it was when its weight is replaced
                node.metadata_props.setdefault(LAYER_NAME_KEY, layer.name)
            self.edits[id(node)] = _Edit(node)
        return self.edits[id(node)]

    def _rotation(self, dim: int, block: int) -> Rotation:
        return Rotation(dim, block, random_signs(dim, self.rng) if self.rng is not None else None)

    def _transform(self, x: ir.Value, rot: Rotation, inverse: bool, tag: dict) -> ir.Value:
        """x · Q = (x ⊙ s) · diag(H) or x · Qᵀ = (x · diag(Hᵀ)) ⊙ s, with the online op."""
        hadamard_function(self.model)
        dtype = (x.dtype or ir.DataType.FLOAT).numpy()
        key = (rot.block, inverse, str(dtype))
        if key not in self.constants:
            a, s = kron_factors(rot.block)
            if inverse:
                a, s = a.T, s.T
            suffix = f"{rot.block}{'_t' if inverse else ''}"
            self.constants[key] = (self._initializer(f"hadamard_{suffix}_a", a.astype(dtype)),
                                   self._initializer(f"hadamard_{suffix}_s", s.astype(dtype)))
        a_v, s_v = self.constants[key]
        info = dict(tag, block=rot.block, signs=rot.signs is not None, inverse=inverse)
        v = x
        if rot.signs is not None and not inverse:
            v = self._node("Mul", [v, self._initializer(f"{x.name}_signs", rot.signs.astype(dtype))], like=x)
            v.producer().metadata_props[ROTATION_KEY] = json.dumps(info)
        y = self._node(HADAMARD_OP, [v, a_v, s_v], like=x, domain=DOMAIN)
        y.producer().metadata_props[ROTATION_KEY] = json.dumps(info)
        if rot.signs is not None and inverse:
            y = self._node("Mul", [y, self._initializer(f"{x.name}_signs", rot.signs.astype(dtype))], like=x)
            y.producer().metadata_props[ROTATION_KEY] = json.dumps(info)
        return y

    def _node(self, op: str, inputs, attrs=None, like: ir.Value | None = None, shape="same",
              domain: str = "") -> ir.Value:
        node = ir.node(op, inputs, attrs, domain=domain, name=self._fresh(f"rotate_{op}"))
        self.graph.append(node)
        out = node.outputs[0]
        out.name = self._fresh(node.name + "_out")
        if like is not None and like.dtype is not None:  # untyped stays untyped (no shape inference yet)
            out.dtype = like.dtype
            if shape == "same" and like.shape is not None:
                out.shape = like.shape
        return out

    def _fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def _ints(self, values: list[int]) -> ir.Value:
        return self._initializer("rotate_axes_last", np.array(values, np.int64), reuse=True)

    def _initializer(self, name: str, array: np.ndarray, reuse: bool = False) -> ir.Value:
        if reuse and name in self.graph.initializers:
            return self.graph.initializers[name]
        name = self._fresh(name)
        # keeps 0-d arrays 0-d; spilled to the graph's TensorStore where it has one (lpcompile.ir.store)
        value = ir.Value(name=name, const_value=new_tensor(self.graph, np.array(array, order="C"), name))
        value.dtype = value.const_value.dtype
        value.shape = ir.Shape(array.shape)
        self.graph.register_initializer(value)
        return value


# --- helpers ----------------------------------------------------------------------------------------


def _tag(node: ir.Node) -> dict:
    text = node.metadata_props.get(ROTATION_KEY)
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {}


def _vector(value: ir.Value | None, dim: int) -> np.ndarray | None:
    if value is None:
        return None
    return np.broadcast_to(value.const_value.numpy().astype(np.float64).reshape(-1), (dim,)).copy()


def _gemm_scales(layer: LinearLayer) -> tuple[float, float]:
    if layer.kind != "gemm":
        return 1.0, 1.0
    alpha = layer.node.attributes.get("alpha")
    beta = layer.node.attributes.get("beta")
    return (alpha.as_float() if alpha is not None else 1.0), (beta.as_float() if beta is not None else 1.0)


def _norm_label(norm: Norm) -> str:
    return f"{norm.kind}:{norm.nodes[-1].name or norm.output.name}"


def _producer_label(p) -> str:
    return f"{p.kind}:{p.layer.name if p.layer is not None else p.value.name}"


def _replace_uses(graph: ir.Graph, old: ir.Value, new: ir.Value, fresh) -> None:
    for use in list(old.uses()):
        use.node.replace_input_with(use.idx, new)
    if old.is_graph_output():
        _replace_graph_output(graph, old, new, fresh)


def _replace_graph_output(graph: ir.Graph, old: ir.Value, new: ir.Value, fresh) -> None:
    """`new` takes `old`'s place (and name) among the graph outputs."""
    name = old.name
    old.name = fresh(f"{name}_rotated")
    new.name = name
    for i, out in enumerate(graph.outputs):
        if out is old:
            graph.outputs[i] = new


# --- measurement ------------------------------------------------------------------------------------


def outlier_stats(model: ir.Model, data, batch_size: int = 8) -> dict[str, dict[str, float]]:
    """Per linear layer (by name): kurtosis of its input's values and the ratio of the largest
    to the median per-channel max |x| (last axis), measured in onnxruntime on `data` (anything
    with `.batches(batch_size)`, e.g. a `CalibrationData`, or a list of feed dicts)."""
    from lpcompile.ir.run import OrtRunner

    layers = [l for l in find_linear_layers(model.graph, convs=False) if l.kind != "embedding" and l.activation is not None]
    names = list(dict.fromkeys(l.activation.name for l in layers))
    runner = OrtRunner(model, extra=names)
    moments = {n: np.zeros(5) for n in names}  # count, Σx, Σx², Σx³, Σx⁴
    absmax: dict[str, np.ndarray] = {}
    batches = data.batches(batch_size) if hasattr(data, "batches") else data
    for batch in batches:
        outputs = runner.run(batch)
        for n in names:
            x = outputs[n].astype(np.float64)
            rows = x.reshape(-1, x.shape[-1])
            m = moments[n]
            m += [x.size, x.sum(), (x**2).sum(), (x**3).sum(), (x**4).sum()]
            cmax = np.abs(rows).max(axis=0)
            absmax[n] = cmax if n not in absmax else np.maximum(absmax[n], cmax)
    result = {}
    for layer in layers:
        n = layer.activation.name
        count, s1, s2, s3, s4 = moments[n]
        if count == 0:
            continue
        mu = s1 / count
        var = s2 / count - mu**2
        m4 = s4 / count - 4 * mu * s3 / count + 6 * mu**2 * s2 / count - 3 * mu**4
        median = float(np.median(absmax[n]))
        result[layer.name] = {
            "kurtosis": float(m4 / var**2) if var > 0 else float("nan"),
            "max_to_median": float(absmax[n].max() / median) if median > 0 else float("inf"),
        }
    return result
