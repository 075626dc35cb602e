"""Measuring the report: the QDQ model against its float reference, per quantized layer and over
the outputs (SQNR, cosine, bytes), and what `--format auto` chose against what it achieved.
Rendering is `lpcompile.report.render`."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from lpcompile.ir.run import OrtRunner
from lpcompile.metrics import cosine, signal_noise_db
from lpcompile.ir.patterns import LAYER_NAME_KEY
from lpcompile.passes.quantize import ACTIVATION_FORMAT_KEY, METHOD_KEY, METHOD_NOTE_KEY, WEIGHT_FORMAT_KEY
from lpcompile.passes.sparsify import DENSITY_KEY, SPARSITY_KEY, sparse_weight_bytes


@dataclass
class _Error:
    count: int = 0
    signal: float = 0.0
    noise: float = 0.0
    cosines: list[float] = field(default_factory=list)
    # What makes an output's error meaningless or uninformative: its range over every element
    # measured, and whether it changes from one sample to the next (float, quantized)
    spread: dict[str, _Spread] = field(default_factory=lambda: {"float": _Spread(), "quantized": _Spread()})

    def add(self, ref: np.ndarray, got: np.ndarray, per_sample_cosine: bool = False) -> None:
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        self.count += ref64.size
        self.signal += float((ref64**2).sum())
        self.noise += float(((ref64 - got64) ** 2).sum())
        if per_sample_cosine:
            self.cosines.extend(cosine(ref64, got64).tolist())
            self.spread["float"].add(ref64)
            self.spread["quantized"].add(got64)

    def degenerate(self) -> dict[str, str]:
        """{"float" | "quantized": what is wrong} for an output that is zero or constant (its error
        measures nothing) or the same for every input (it measures nothing about the input)."""
        return {side: why for side, s in self.spread.items() if (why := s.degenerate())}

    @property
    def sqnr_db(self) -> float:
        """lpcompile.metrics' convention: capped at ±EXACT_DB, NaN when nothing was measured."""
        return signal_noise_db(self.signal, self.noise) if self.count else float("nan")


@dataclass
class _Spread:
    lo: float = np.inf
    hi: float = -np.inf
    first: np.ndarray | None = None  # the first sample, to tell an input-independent output
    varies: bool = False  # some sample differs from the first
    samples: int = 0

    def add(self, x: np.ndarray) -> None:
        if not x.size:
            return
        finite = x[np.isfinite(x)]
        if finite.size:
            self.lo, self.hi = min(self.lo, float(finite.min())), max(self.hi, float(finite.max()))
        rows = x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)
        if self.first is None:
            self.first = rows[0].copy()
        scale = max(float(np.abs(self.first).max(initial=0.0)), 1e-30)
        if rows.shape[1] == self.first.size and not self.varies:
            self.varies = bool((np.abs(rows - self.first) > 1e-6 * scale).any())
        self.samples += rows.shape[0]

    def degenerate(self) -> str | None:
        if self.first is None:
            return None
        if self.hi == self.lo == 0.0:
            return "is zero everywhere"
        if self.hi == self.lo:
            return f"is the constant {self.hi:g} everywhere"
        if self.samples > 1 and not self.varies:
            return f"is the same for every one of the {self.samples} samples measured"
        return None


def quantized_layers(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if WEIGHT_FORMAT_KEY in n.metadata_props or ACTIVATION_FORMAT_KEY in n.metadata_props
            or SPARSITY_KEY in n.metadata_props]


def measure_error(
    float_model: ir.Model, qdq_model: ir.Model, batches: Iterable[Mapping[str, np.ndarray]]
) -> tuple[dict[str, _Error], dict[str, _Error]]:
    """Per quantized layer output and per model output: accumulated error statistics (nothing
    measured, and no onnxruntime session built, when there are no batches)."""
    layer_outputs = [n.outputs[0].name for n in quantized_layers(qdq_model)]
    model_outputs = [v.name for v in float_model.graph.outputs]
    per_layer = {name: _Error() for name in layer_outputs}
    per_output = {name: _Error() for name in model_outputs}
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        return per_layer, per_output
    ref = OrtRunner(float_model, extra=layer_outputs)
    got = OrtRunner(qdq_model, extra=layer_outputs)
    for batch in itertools.chain([first], batches):
        r, g = ref.run(batch), got.run(batch)
        for name in layer_outputs:
            per_layer[name].add(r[name], g[name])
        for name in model_outputs:
            if np.issubdtype(r[name].dtype, np.floating):
                per_output[name].add(r[name], g[name], per_sample_cosine=True)
    return per_layer, per_output


def weight_bytes(qdq_model: ir.Model, node: ir.Node) -> tuple[int, int]:
    """(bytes of the float32 weight, bytes of its quantized form incl. scales and zero points)."""
    if SPARSITY_KEY in node.metadata_props:  # compressed: values, indices or mask, scales
        return sparse_weight_bytes(node)
    for value in node.inputs:
        producer = value.producer() if value is not None else None
        if producer is not None and producer.op_type == "DequantizeLinear":
            q = producer.inputs[0].const_value
            if q is None:
                continue
            numel = int(np.prod(q.shape.numpy()))
            total = _packed_bytes(q)
            for extra in producer.inputs[1:]:
                if extra is not None and extra.const_value is not None:
                    total += _packed_bytes(extra.const_value)
            return numel * 4, total
    return 0, 0


def _packed_bytes(tensor) -> int:
    numel = int(np.prod(tensor.shape.numpy())) if len(tensor.shape) else 1
    return -(-numel * tensor.dtype.bitwidth // 8)


def build_report(
    float_model: ir.Model,
    qdq_model: ir.Model,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    format: str,
    target: str,
    calibration: dict | None,
    stages: dict[str, float],
    excluded: list[str],
    original: ir.Model | None = None,
) -> dict:
    """The report of `qdq_model` against `float_model` (its float reference: rotated where the
    QDQ model is) measured on `batches`; `original`: the user's model the whole-model bytes are
    counted on (default `float_model`)."""
    per_layer, per_output = measure_error(float_model, qdq_model, batches)
    layers = []
    for node in quantized_layers(qdq_model):
        fp32, packed = weight_bytes(qdq_model, node)
        wspec = node.metadata_props.get(WEIGHT_FORMAT_KEY)
        aspec = node.metadata_props.get(ACTIVATION_FORMAT_KEY)
        layers.append(
            {
                "name": node.metadata_props.get(LAYER_NAME_KEY, node.name),
                "op": node.op_type,
                "weight_format": wspec or "float32",
                "activation_format": aspec or "float32",
                "weight_method": node.metadata_props.get(METHOD_KEY),  # the method that ran
                "weight_method_note": node.metadata_props.get(METHOD_NOTE_KEY),  # why not the one asked
                "weight_bytes_fp32": fp32,
                "weight_bytes": packed,
                "sqnr_db": _num(per_layer[node.outputs[0].name].sqnr_db),
                "sparsity": node.metadata_props.get(SPARSITY_KEY),  # the pattern that ran (None: dense)
                "density": float(node.metadata_props.get(DENSITY_KEY, 1.0)),
            }
        )
    outputs, warnings = {}, []
    for name, err in per_output.items():
        cos = np.array(err.cosines)
        entry = {"sqnr_db": _num(err.sqnr_db),
                 "cosine_mean": float(cos.mean()) if len(cos) else None,
                 "cosine_min": float(cos.min()) if len(cos) else None,
                 "cosine_p5": float(np.percentile(cos, 5)) if len(cos) else None}
        for side, why in err.degenerate().items():
            warnings.append(f"output {name!r} of the {side} model {why}: its error against float "
                            + ("measures nothing (cosine and SQNR not reported)" if "everywhere" in why
                               else "says nothing about how inputs are treated"))
            if "everywhere" in why:  # a zero or constant output: never "cosine 1.00000"
                entry.update(sqnr_db=None, cosine_mean=None, cosine_min=None, cosine_p5=None)
            entry.setdefault("degenerate", {})[side] = why
        outputs[name] = entry
    first = next(iter(outputs.values()), {"sqnr_db": None, "cosine_mean": None})
    all_fp32 = sum(_packed_bytes(v.const_value) * 32 // max(v.const_value.dtype.bitwidth, 1)
                   for v in (original or float_model).graph.initializers.values() if v.const_value is not None
                   and v.const_value.dtype.is_floating_point())
    stored = sum(_packed_bytes(v.const_value) for v in qdq_model.graph.initializers.values() if v.const_value is not None)
    layer_fp32 = sum(l["weight_bytes_fp32"] for l in layers)
    layer_bytes = sum(l["weight_bytes"] for l in layers)
    totals = {
        "layers_quantized": len(layers),
        "weight_bytes_fp32": layer_fp32,
        "weight_bytes": layer_bytes,
        # Every float initializer of the user's model in fp32 (the quantized layers' weights and
        # everything else: norms, biases, float layers), and every initializer the QDQ model stores
        # (low-bit weights with their scales, what stayed float, rotation constants): the ratio a
        # user sees on disk, beside the ratio over the quantized layers alone
        "model_float_bytes": all_fp32,
        "model_bytes": stored,
        "output_sqnr_db": first["sqnr_db"],
        "output_cosine": first["cosine_mean"],
        "output_cosine_min": first.get("cosine_min"),
        "output_cosine_p5": first.get("cosine_p5"),  # the tail: 5th percentile of per-sample cosines
    }
    return {
        "format": format,
        "target": target,
        "calibration": calibration,
        "excluded": excluded,
        "layers": layers,
        "totals": totals,
        "outputs": outputs,
        "warnings": warnings,
        "stages_seconds": {k: round(v, 3) for k, v in stages.items()},
    }


def _num(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)  # SQNRs are finite (metrics.EXACT_DB caps them)


# --- format selection (format="auto") ------------------------------------------------------------


def select_report(plan, report: dict, layers, goal=None) -> dict:
    """What select chose and why, next to what the QDQ model achieved: per layer the chosen
    formats, the measured sensitivity of every candidate, the ExMy analysis and outlier severity;
    totals (achieved average weight bits count float layers at 32 bits); and whether the FP8
    exponent choice follows the outliers (rank correlation of the input's max/median channel
    ratio with the exponent bits of its best ExMy format)."""
    measured = {l["name"]: l for l in report["layers"]}
    params = {l.name: l.in_features * l.out_features for l in layers}
    sens = plan.sensitivity or {}
    rows, bits = [], 0
    for choice in plan.layers:
        q = measured.get(choice.name)
        layer_bits = q["weight_bytes"] * 8 if q and q["weight_format"] != "float32" else 32 * params[choice.name]
        bits += layer_bits
        s = sens.get(choice.name, {})
        exmy = s.get("exmy") or {}
        rows.append({
            "name": choice.name,
            "weights": str(choice.weights) if choice.weights else "float",
            "activations": str(choice.activations) if choice.activations else "float",
            "reason": choice.reason,
            "bits_per_weight": layer_bits / params[choice.name],
            "predicted_nsr": choice.predicted.get("nsr"),
            "layer_sqnr_db": q["sqnr_db"] if q else None,
            "e2e_sqnr_db": {k: v["sqnr_db"] for k, v in (s.get("e2e_weights") or {}).items()},
            "e2e_activation_sqnr_db": {k: v["sqnr_db"] for k, v in (s.get("e2e_activations") or {}).items()},
            "local_sqnr_db": s.get("local_weights") or {},
            "local_activation_sqnr_db": s.get("local_activations") or {},
            "exmy": exmy,
            "fp8_activation": s.get("fp8_activation"),
            "outliers": s.get("outliers"),
            "latency_us": choice.latency_us,
        })
    planned = {c.name for c in plan.layers}
    bits += sum(32 * p for n, p in params.items() if n not in planned)
    total_params = sum(params.values())
    achieved = bits / total_params if total_params else 0.0
    return {
        "budget": plan.budget,
        "predicted": {k: plan.totals.get(k) for k in ("avg_weight_bits", "predicted_sqnr_db", "predicted_cosine")},
        "achieved": {"avg_weight_bits": achieved, "weight_bytes": bits / 8,
                     "output_sqnr_db": report["totals"]["output_sqnr_db"],
                     "output_cosine": report["totals"]["output_cosine"],
                     "output_cosine_p5": report["totals"].get("output_cosine_p5"),
                     "output_cosine_min": report["totals"].get("output_cosine_min"),
                     # the sum of the chosen layers' measured kernel latencies (None: not measured)
                     "latency_us": plan.totals.get("latency_us"),
                     "budget_met": _budget_met(plan.budget, achieved, bits / 8, report["totals"]["output_cosine"],
                                               plan.totals.get("latency_us"), goal, report["totals"])},
        "latency": plan.totals.get("latency"),
        "verification": plan.totals.get("verification"),
        "exponent_vs_outliers": exponent_agreement(rows),
        "pins": plan.pins,
        "measurement_seconds": sens.get("@seconds"),
        "sensitivity_cached": plan.totals.get("sensitivity_cached"),
        "layers": rows,
    }


def _budget_met(budget: dict, avg_bits: float, total_bytes: float, cosine: float | None,
                latency_us: float | None = None, goal=None, totals: dict | None = None) -> bool | None:
    """Whether the achieved totals meet the goal (the goal says; a reused plan without a goal is
    judged by the budget it records)."""
    achieved = {"avg_weight_bits": avg_bits, "weight_bytes": total_bytes, "output_cosine": cosine,
                "latency_us": latency_us, **{k: (totals or {}).get(k) for k in ("output_cosine_p5", "output_cosine_min")}}
    if goal is not None:
        return goal.met(achieved)
    kind, value = budget.get("kind"), budget.get("value")
    if kind == "latency":
        return latency_us is not None and latency_us <= value
    if kind == "bits":
        return avg_bits <= value + 1e-9
    if kind == "bytes":
        return total_bytes <= value
    if kind == "min_cosine":
        got = achieved.get({"p5": "output_cosine_p5", "min": "output_cosine_min"}.get(budget.get("stat"), "output_cosine"))
        return got is not None and got >= value
    return None


def exponent_agreement(rows: list[dict]) -> dict:
    """Spearman rank correlation, over layers with an ExMy analysis, between the input's outlier
    severity (largest / median channel max) and the exponent bits of the best ExMy format for the
    input (and for the deployable E4M3/E5M2 choice). +1: heavier outliers always got more exponent."""
    pts = [(r["outliers"]["max_to_median"], r["outliers"]["kurtosis"], int(r["exmy"]["activations_best"]["exmy"][1]),
            int(r["exmy"]["activations_best"]["deployable"][1]),
            r["exmy"]["activations_db"]["e4m3"] - r["exmy"]["activations_db"]["e2m5"])
           for r in rows if r.get("outliers") and (r.get("exmy") or {}).get("activations_best")]
    if len(pts) < 3:
        return {"layers": len(pts)}
    sev, kurt, best_e, deploy_e, gain = (np.array(v, np.float64) for v in zip(*pts))
    by_exponent = {}
    for e in sorted(set(best_e.astype(int))):
        by_exponent[f"e{e}"] = {"layers": int((best_e == e).sum()), "median_max_to_median": float(np.median(sev[best_e == e]))}
    # The argmax is coarse (often one split wins everywhere); the dB that two more exponent bits
    # buy (E4M3 over E2M5) shows the same trend continuously.
    return {"layers": len(pts), "spearman_best_exmy": _spearman(sev, best_e),
            "spearman_deployable": _spearman(sev, deploy_e),
            "spearman_exponent_gain_vs_max_to_median": _spearman(sev, gain),
            "spearman_exponent_gain_vs_kurtosis": _spearman(kurt, gain), "by_best_exponent": by_exponent}


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks
