"""The plan: what each layer gets. The one contract between choosing and applying.

A `Plan` says, per linear layer (MatMul / Gemm / embedding table): the weight spec, the input
(activation) spec, the weight method, the rotation its input went through, room for a sparsity
pattern, and why. Three things build one, and only one thing applies it:

- a named recipe builds a uniform plan (`Plan.uniform`, run as the `UniformPlan` pass);
- the `select` pass builds a measured one under a goal (`lpcompile.goals`);
- a user's plan.json edits either (its `pins`: fnmatch patterns on layer names);
- the `quantize` pass applies the plan it is given (or the one in `model.meta[PLAN_KEY]`).

Layer exclusion (`--exclude`, `:first`, `:last`) is resolved here, once, when a plan is built:
a uniform plan keeps the excluded layers in float; a measured plan gets them as pins, so its
budget counts them. Every run writes the plan it used (`plan.json`), so any run can be repeated
or edited.
"""

from __future__ import annotations

import fnmatch
import glob
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from lpcompile.errors import FormatError, LpcompileError
from lpcompile.formats import QuantSpec

PLAN_KEY = "lpcompile.plan"  # model.meta key of the plan a pass wrote (or the quantize pass applies)
FLOAT = "float"  # the printed form of "keep in float" in plans
METHODS = ("rtn", "mse", "gptq", "gptq-clip")  # weight methods (lpcompile.passes.weight_quant)
PLAN_VERSION = 1
FIRST, LAST = ":first", ":last"  # exclusion patterns naming the first / last dense linear layer


def spec_text(spec: QuantSpec | None) -> str:
    return FLOAT if spec is None else str(spec)


def parse_spec(text: str | QuantSpec | None) -> QuantSpec | None:
    if isinstance(text, QuantSpec):
        return text
    return None if text in (None, FLOAT, "none", "float32", "fp32", "keep") else QuantSpec.parse(text)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise FormatError(f"unknown weight method {method!r}; choose one of: {', '.join(METHODS)}")
    return method


def weight_bits(spec: QuantSpec | None, k: int, n: int, float_bits: int = 32) -> int:
    """Bits a [K, N] weight takes in `spec`: codes, float32 scales and (asymmetric) zero points;
    `None` keeps it in float (`float_bits` per value: the model's own float32)."""
    from lpcompile.passes.weight_quant import group_shape

    if spec is None:
        return float_bits * k * n
    shape = group_shape(spec, (k, n))
    groups = 1
    for d in shape:
        groups *= d
    fmt = spec.format
    zero_points = groups * fmt.bits if not spec.symmetric else 0
    scale_bits = spec.scale_format.bits if spec.scale_format is not None else 32
    return k * n * fmt.bits + groups * scale_bits + zero_points


def excluded_layers(patterns: Iterable[str], layers: Sequence) -> set[str]:
    """The names of `layers` that `patterns` keep in float: fnmatch patterns on layer names, plus
    FIRST / LAST for the first and last dense (non-embedding) linear layer."""
    dense = [l.name for l in layers if l.kind != "embedding"]
    special = {FIRST: dense[0] if dense else None, LAST: dense[-1] if dense else None}
    out = set()
    for pattern in patterns:
        if pattern in special:
            if special[pattern] is not None:
                out.add(special[pattern])
            continue
        out.update(l.name for l in layers if fnmatch.fnmatchcase(l.name, pattern))
    return out


# --- the plan ------------------------------------------------------------------------------------


@dataclass
class LayerChoice:
    """One layer's entry in the plan (what plan.json holds per layer). `weights` / `activations`
    None keep that side in float. `sparsity`: the pattern a sparsify pass is to apply (None: dense)."""

    name: str
    weights: QuantSpec | None
    activations: QuantSpec | None
    method: str = "gptq"
    rotation: str = "none"
    reason: str = ""
    shape: tuple[int, int] = (0, 0)  # canonical [K, N] of the weight
    bits: int = 0  # weight bits of this choice, scales included
    predicted: dict = field(default_factory=dict)  # {"nsr": ..., "cosine_loss": ...} from sensitivity
    pinned: bool = False
    latency_us: float | None = None  # the measured kernel latency of this choice (None: not measured)
    sparsity: str | None = None

    def __post_init__(self):
        check_method(self.method)
        if self.sparsity is not None:  # "2:4", "0.5", "4:8:wanda" (lpcompile.passes.sparsify.SparsityPattern)
            from lpcompile.passes.sparsify import check_sparsity

            self.sparsity = check_sparsity(self.sparsity)

    def to_json(self) -> dict:
        return {"name": self.name, "weights": spec_text(self.weights), "activations": spec_text(self.activations),
                "method": self.method, "rotation": self.rotation, "reason": self.reason, "shape": list(self.shape),
                "bits": self.bits, "predicted": self.predicted, "pinned": self.pinned, "latency_us": self.latency_us,
                "sparsity": self.sparsity}

    @classmethod
    def from_json(cls, d: dict) -> "LayerChoice":
        return cls(d["name"], parse_spec(d.get("weights")), parse_spec(d.get("activations")), d.get("method", "gptq"),
                   d.get("rotation", "none"), d.get("reason", ""), tuple(int(v) for v in d.get("shape", (0, 0))),
                   int(d.get("bits", 0)),
                   dict(d.get("predicted") or {}), bool(d.get("pinned", False)),
                   None if d.get("latency_us") is None else float(d["latency_us"]), d.get("sparsity"))


@dataclass
class Plan:
    """Per-layer choices, the goal they were chosen for, and the measurements behind them.

    `budget`: the goal (`{"kind": "recipe", "value": "int4"}` for a uniform plan; bits, bytes,
    latency or min_cosine for a measured one). `pins` (pattern -> {"weights": spec|"float",
    "activations": ..., "method": ...}) are the user's: fnmatch patterns on layer names that a
    solver must respect (and a reused plan applies on top of its layers)."""

    layers: list[LayerChoice]
    budget: dict = field(default_factory=dict)
    totals: dict = field(default_factory=dict)
    pins: dict[str, dict] = field(default_factory=dict)
    sensitivity: dict = field(default_factory=dict)  # layer -> measurements (see Select); "@key", "@seconds"

    # --- building ------------------------------------------------------------------------------

    @classmethod
    def uniform(cls, layers: Sequence, weights: QuantSpec | str | None, activations: QuantSpec | str | None = None,
                embeddings: QuantSpec | str | None = None, method: str = "gptq", exclude: Iterable[str] = (),
                name: str = "uniform", sparsity: str | None = None) -> "Plan":
        """One spec for every dense linear layer (`weights` x `activations`) and one for every
        embedding table (`embeddings`, weights only: its input is token ids); layers matched by
        `exclude` stay in float. This is what a named recipe means. `sparsity`: a pattern for
        every dense MatMul/Gemm layer that is not excluded (`lpcompile.passes.sparsify`)."""
        weights, activations, embeddings = parse_spec(weights), parse_spec(activations), parse_spec(embeddings)
        check_method(method)
        excluded = excluded_layers(exclude, layers)
        choices = []
        for layer in layers:
            k, n = layer.in_features, layer.out_features
            if layer.name in excluded:
                w, a, m, why = None, None, "mse", "excluded by the user"
            elif layer.kind == "embedding":
                w, a, m, why = embeddings, None, "mse", f"{name} (embedding table: no input to compensate over)"
            else:
                w, a, m, why = weights, activations if layer.activation is not None else None, method, name
                if layer.kind == "conv":
                    w, a, why = _fit_conv(layer, w, a, why)
            sparse = sparsity if sparsity and layer.kind in ("matmul", "gemm") and layer.name not in excluded else None
            choices.append(LayerChoice(layer.name, w, a, m if w is not None else "mse", reason=why, shape=(k, n),
                                       bits=weight_bits(w, k, n) if sparse is None else _sparse_bits(w, k, n, sparse),
                                       sparsity=sparse))
        plan = cls(choices, {"kind": "recipe", "value": name})
        plan.totals = plan.bit_totals()
        return plan

    @classmethod
    def from_recipe(cls, recipe, layers: Sequence, exclude: Iterable[str] = ()) -> "Plan":
        """The uniform plan a named recipe (`lpcompile.recipes.Recipe`) means for `layers`."""
        return cls.uniform(layers, recipe.weights, recipe.activations, recipe.embeddings, recipe.method, exclude,
                           name=recipe.name)

    def with_exclusions(self, exclude: Iterable[str], layers: Sequence) -> "Plan":
        """This plan with the layers `exclude` matches pinned to float (exact, escaped names), so a
        solver counts them against its budget."""
        names = excluded_layers(exclude, layers)
        if not names:
            return self
        pins = dict(self.pins)
        for name in sorted(names):
            pins[glob.escape(name)] = {"weights": FLOAT, "activations": FLOAT}
        return replace(self, pins=pins)

    def with_pins_applied(self) -> "Plan":
        """This plan with every pin written into the layers it matches."""
        layers = []
        for c in self.layers:
            pin = self.pinned_choice(c.name)
            if pin is not None:
                w, a, method = pin
                c = LayerChoice(c.name, w, a, method, c.rotation, "pinned by the user", c.shape,
                                weight_bits(w, *c.shape), {}, True)
            layers.append(c)
        return Plan(layers, self.budget, self.totals, self.pins, self.sensitivity)

    def check_against(self, layers: Sequence) -> None:
        """Refuse a plan naming layers `layers` lacks, or a pin matching none of them."""
        names = {l.name for l in layers}
        unknown = [c.name for c in self.layers if c.name not in names]
        if unknown:
            raise LpcompileError(f"the plan names layers this model does not have: {', '.join(unknown[:3])}"
                                 + (" ..." if len(unknown) > 3 else ""))
        for pattern in self.pins:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise LpcompileError(f"plan pin {pattern!r} matches no layer of this model")

    # --- reading -------------------------------------------------------------------------------

    def choice(self, name: str) -> LayerChoice | None:
        """The entry for layer `name` (None: the plan does not cover it; it stays as it is)."""
        return next((c for c in self.layers if c.name == name), None)

    def pinned_choice(self, name: str) -> tuple[QuantSpec | None, QuantSpec | None, str] | None:
        """The last pin whose pattern matches `name` (weights, activations, method), if any."""
        hit = None
        for pattern, pin in self.pins.items():
            if fnmatch.fnmatchcase(name, pattern):
                hit = (parse_spec(pin.get("weights")), parse_spec(pin.get("activations")), pin.get("method", "gptq"))
        return hit

    def bit_totals(self) -> dict:
        bits = sum(c.bits for c in self.layers)
        params = sum(c.shape[0] * c.shape[1] for c in self.layers)
        return {"params": params, "weight_bits": bits, "avg_weight_bits": bits / params if params else 0.0,
                "weight_bytes": bits / 8}

    def set_latency(self, costs, embeddings: frozenset[str] = frozenset()) -> None:
        """Each layer's `latency_us` from `costs` (select's LatencyCosts: `of(name, w, a)`) and the
        totals: the sum over the layers timed (`embeddings`, gathers, are not kernels timed), and
        which layers were not."""
        untimed = []
        for c in self.layers:
            c.latency_us = costs.of(c.name, c.weights, c.activations)
            if c.latency_us is None and c.name not in embeddings:
                untimed.append(c.name)
        timed = [c.latency_us for c in self.layers if c.latency_us is not None]
        self.totals["latency_us"] = sum(timed) if timed else None
        self.totals["latency"] = {"tokens": costs.tokens, "target": costs.target, "layers_timed": len(timed),
                                  "untimed": untimed, "note": costs.note}

    def annotate_rotations(self, meta: dict | None, mode: str) -> None:
        """Each entry's `rotation`: how the rotate pass turned that layer's input (folded into a
        residual-stream region or a producer/consumer chain, online, or none), from the rotate
        pass's report `meta`."""
        per_layer: dict[str, str] = {}
        for key in ("regions", "chains"):
            for site in (meta or {}).get(key, []):
                if site.get("status") == "folded":
                    for name in site.get("consumers", []):
                        per_layer[name] = f"folded ({site['name']}: {site.get('rotation', '')})"
        for entry in (meta or {}).get("online", []):
            for name in entry.get("layers", []):
                per_layer[name] = f"online ({entry.get('rotation', '')})"
        for c in self.layers:
            c.rotation = per_layer.get(c.name, "none" if mode == "off" else f"none (rotate {mode})")

    # --- plan.json -----------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {"version": PLAN_VERSION, "budget": self.budget, "totals": self.totals, "pins": self.pins,
                "layers": [c.to_json() for c in self.layers], "sensitivity": self.sensitivity}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2, allow_nan=False, default=_plain))

    @classmethod
    def from_json(cls, d: dict) -> "Plan":
        if not isinstance(d, dict) or not isinstance(d.get("layers", []), list):
            raise LpcompileError("plan: expected a JSON object with a list 'layers'")
        if d.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise LpcompileError(f"plan: version {d.get('version')!r} is not one this lpcompile reads ({PLAN_VERSION})")
        pins = d.get("pins") or {}
        if not isinstance(pins, dict):
            raise LpcompileError("plan: 'pins' must map layer-name patterns to {weights, activations}")
        try:
            layers = [LayerChoice.from_json(x) for x in d.get("layers", [])]
            for pattern, pin in pins.items():
                parse_spec(pin.get("weights")), parse_spec(pin.get("activations")), check_method(pin.get("method", "gptq"))
        except (KeyError, TypeError, AttributeError) as e:
            raise LpcompileError(f"plan: malformed entry ({type(e).__name__}: {e})") from None
        except FormatError as e:
            raise FormatError(f"plan: {e}") from None
        return cls(layers, dict(d.get("budget") or {}), dict(d.get("totals") or {}), dict(pins),
                   dict(d.get("sensitivity") or {}))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise LpcompileError(f"plan file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise LpcompileError(f"plan file {path} cannot be read: {e}") from None
        except json.JSONDecodeError as e:
            raise LpcompileError(f"plan file {path} is not JSON: {e}") from None
        return cls.from_json(data)


def _fit_conv(layer, weights: QuantSpec | None, activations: QuantSpec | None, why: str):
    """A recipe's specs as a conv layer can take them (`lpcompile.ir.patterns.conv_weight_spec`);
    per-token dynamic input scales reduce over the last axis, which on a conv input is a spatial
    one, so the conv's input stays float under such recipes."""
    from lpcompile.ir.patterns import conv_weight_spec

    weights, note = conv_weight_spec(layer, weights)
    notes = [why, note] if note else [why]
    if activations is not None and activations.dynamic:
        activations = None
        notes.append("conv: per-token input scales reduce over a spatial axis here, so the input stays float")
    return weights, activations, "; ".join(notes)


def _sparse_bits(spec: QuantSpec | None, k: int, n: int, sparsity: str) -> int:
    from lpcompile.passes.sparsify import sparse_weight_bits

    return sparse_weight_bits(spec, k, n, sparsity)


def _plain(o):
    """numpy scalars and arrays in plan totals / sensitivity as plain JSON values."""
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")
