"""select's measurements: every layer's sensitivity to each candidate format.

For every layer and candidate: the *layer-local* error (SQNR of x·W with only the weights, or only
the input, quantized; numpy, on input rows captured once from calibration data) and the
*end-to-end* error (the model output's NSR and cosine loss with only that layer quantized, in
onnxruntime: one session where every weight is an overridable input, one per activation candidate
with `Where(selector, QDQ(x), x)` on every layer input), the ExMy FP8 analysis (E2M5..E5M2 local
SQNRs, "FP8 Quantization: The Power of the Exponent") and the input's outlier severity."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lpcompile.errors import PassError
from lpcompile.formats import MIN_SCALE, PerChannel, PerTensor, QuantSpec, fp8_exmy
from lpcompile.ir.patterns import LinearLayer, conv_gram_key, conv_patches, conv_weight_spec, find_linear_layers
from lpcompile.ir.run import OrtRunner
from lpcompile.metrics import cosine, nsr_to_db, sqnr_db as _sqnr_db
from lpcompile.passes.calibrate import Calibration
from lpcompile.passes.quantize import activation_scale, insert_activation_qdq
from lpcompile.passes.select.costs import DEPLOYABLE_FP8
from lpcompile.passes.weight_quant import quantize_weight

EXMY = ((2, 5), (3, 4), (4, 3), (5, 2))


# --- numerics of the candidates, in numpy -----------------------------------------------------------


def fake_quantize_activation(x: np.ndarray, spec: QuantSpec, stats) -> np.ndarray:
    """`x` (rows of the last axis) through `spec` as the QDQ graph computes it: dynamic per-token
    scales from each row's max, static ones from calibration (`stats`: TensorStats)."""
    fmt = spec.format
    if spec.dynamic:
        scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / fmt.max_finite, MIN_SCALE)
        return fmt.quantize(x / scale) * scale
    scale, zp = activation_scale(stats, spec)
    if zp:
        return (np.clip(np.rint(x / scale) + zp, fmt.qmin, fmt.qmax) - zp) * scale
    return fmt.quantize(x / scale) * scale




@dataclass
class _OutputError:
    signal: float = 0.0
    noise: float = 0.0
    cos_sum: float = 0.0
    samples: int = 0

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        r = ref.astype(np.float64).reshape(ref.shape[0], -1)
        g = got.astype(np.float64).reshape(r.shape)
        self.signal += float((r**2).sum())
        self.noise += float(((r - g) ** 2).sum())
        self.cos_sum += float(cosine(r, g).sum())
        self.samples += r.shape[0]

    def result(self) -> dict:
        nsr = self.noise / self.signal if self.signal > 0 else 0.0
        return {"nsr": nsr, "cosine_loss": max(0.0, 1.0 - self.cos_sum / max(self.samples, 1)),
                "sqnr_db": nsr_to_db(nsr)}


# --- measuring ------------------------------------------------------------------------------------


def measure_sensitivity(model: ir.Model, layers: Sequence[LinearLayer], calibration: Calibration,
                        cfg) -> dict[str, dict]:
    """Per layer name: shape, parameters, local and end-to-end errors of every candidate, the
    ExMy analysis and the input's outlier severity (see the module docstring)."""
    batches = _take(cfg.data, cfg.samples, cfg.batch_size)
    if not batches:
        raise PassError("select: the calibration data yielded no batches")
    acts = [QuantSpec.parse(a) for a in cfg.analysis_activations]
    acts += [a if isinstance(a, QuantSpec) else QuantSpec.parse(a) for a in cfg.activations
             if a is not None and str(a) not in {str(x) for x in acts}]
    start = time.perf_counter()
    captured = _capture_inputs(model, layers, batches, cfg.rows)
    sens: dict[str, dict] = {}
    weight_q: dict[tuple[str, str], np.ndarray] = {}
    for done, layer in enumerate(layers):
        w = _canonical_weight(layer)
        k, n = w.shape
        s = {"kind": layer.kind, "shape": [k, n], "params": k * n,
             "weights": list(cfg.embeddings if layer.kind == "embedding" else cfg.weights)}
        x = captured.get(layer.name)
        st = calibration.stats.get(layer.activation.name) if layer.activation is not None else None
        gram = st.gram if st is not None else None  # GPTQ where Calibrate recorded XᵀX, as Quantize will
        if layer.kind == "conv":  # over its im2col patches (x is patches too); per-token scales do not apply
            gram = getattr(calibration.stats.get(conv_gram_key(layer)), "gram", None)
        s["local_weights"] = {}
        for spec_s in s["weights"]:
            spec = QuantSpec.parse(spec_s)
            fitted = conv_weight_spec(layer, spec)[0]  # what Quantize will apply to a conv
            wq = quantize_weight(w, fitted, cfg.method, gram).dequantize().astype(np.float32)
            weight_q[(layer.name, str(spec))] = np.ascontiguousarray(layer.to_storage(wq))
            s["local_weights"][str(spec)] = _local_sqnr(layer, x, w, wq)
        if layer.kind != "embedding" and x is not None:
            ref = x @ w
            s["local_activations"] = {str(a): _sqnr_db(ref, fake_quantize_activation(x, a, st) @ w) for a in acts
                                      if (st is not None or a.dynamic) and not (layer.kind == "conv" and a.dynamic)}
            s["exmy"] = _exmy(w, x, st)
            s["outliers"] = _outliers(st, x)
            best = max(DEPLOYABLE_FP8, key=lambda f: s["exmy"]["activations_db"][_exmy_name(f)])
            s["fp8_activation"] = best
            wbest = max(DEPLOYABLE_FP8, key=lambda f: s["exmy"]["weights_db"][_exmy_name(f)])
            s["weights"] = [t for t in s["weights"] if QuantSpec.parse(t).format.name not in DEPLOYABLE_FP8
                            or QuantSpec.parse(t).format.name == wbest]
        sens[layer.name] = s
        if cfg.progress:
            cfg.progress("select: layer-local", done + 1, len(layers))
    local = time.perf_counter()
    _end_to_end(model, layers, calibration, batches, acts, weight_q, sens, cfg.progress)
    sens["@seconds"] = {"local": round(local - start, 2), "end_to_end": round(time.perf_counter() - local, 2),
                       "samples": sum(len(next(iter(b.values()))) for b in batches)}
    return sens


def _fingerprint(model: ir.Model, key: dict, batches) -> str:
    """What select's measurements depend on, hashed: the graph (ops, wiring, attributes), every
    initializer's bytes (read one at a time), the calibration samples measured on, and `key`."""
    h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode())
    for node in model.graph:
        h.update(f"{node.domain}::{node.op_type}({[v.name if v else '' for v in node.inputs]})->"
                 f"{[v.name for v in node.outputs]}{sorted((k, str(a)) for k, a in node.attributes.items())}".encode())
    for name, value in sorted(model.graph.initializers.items()):
        h.update(name.encode())
        if value.const_value is not None:
            h.update(value.const_value.tobytes())
    for batch in batches:
        for name in sorted(batch):
            a = np.ascontiguousarray(batch[name])
            h.update(f"{name}{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()[:32]


def _exmy_name(fmt_name: str) -> str:
    return {"fp8_e4m3": "e4m3", "fp8_e5m2": "e5m2"}[fmt_name]


def _take(data, samples: int, batch_size: int) -> list[dict[str, np.ndarray]]:
    """About `samples` samples of `data` as batches, spread evenly over all its batches (a
    directory of length buckets must not give only the shortest), kept: every measurement
    reuses them."""
    source = data.batches(batch_size) if hasattr(data, "batches") else data
    every = [dict(b) for b in source]
    sizes = [len(next(iter(b.values()))) for b in every]
    if sum(sizes) <= samples:
        return every
    want = max(1, round(len(every) * samples / sum(sizes)))
    picks = np.unique(np.linspace(0, len(every) - 1, want).round().astype(int))
    return [every[i] for i in picks]


def _canonical_weight(layer: LinearLayer) -> np.ndarray:
    return layer.canonical(layer.weight.const_value.numpy().astype(np.float32))


def _capture_inputs(model: ir.Model, layers: Sequence[LinearLayer], batches, rows: int) -> dict[str, np.ndarray]:
    """Per layer, up to `rows` rows of its float input (a fixed random subset of all rows seen);
    for embeddings, the rows of the table that the calibration ids look up (as one-hot inputs
    they would be: the local error of a table is the error of the rows actually used)."""
    names = {}
    for layer in layers:
        if layer.kind == "embedding":
            names[layer.name] = layer.node.inputs[1].name
        elif layer.activation is not None:
            names[layer.name] = layer.activation.name
    runner = OrtRunner(model, extra=sorted(set(names.values())))
    seen: dict[str, list[np.ndarray]] = {v: [] for v in set(names.values())}
    convs = {l.name: l for l in layers if l.kind == "conv" and l.name in names}  # their rows are im2col patches
    patches_seen: dict[str, list[np.ndarray]] = {name: [] for name in convs}
    for batch in batches:
        out = {**batch, **runner.run(batch)}
        for name, layer in convs.items():
            patches = conv_patches(layer, out[names[name]])
            if patches is not None:
                patches_seen[name].append(patches)
        for v in seen:
            a = out[v]
            seen[v].append(a.reshape(-1) if np.issubdtype(a.dtype, np.integer) else a.reshape(-1, a.shape[-1]))
    rng = np.random.default_rng(0)
    captured = {}
    for name, v in names.items():
        if name in convs and not patches_seen[name]:
            continue  # a grouped / transposed conv: no patch matrix, weight-only local errors
        a = np.concatenate(patches_seen[name] if name in convs else seen[v])
        if len(a) > rows:
            a = a[np.sort(rng.choice(len(a), rows, replace=False))]
        captured[name] = a.astype(np.float32) if a.dtype.kind == "f" else a
    return captured


def _local_sqnr(layer: LinearLayer, x: np.ndarray | None, w: np.ndarray, wq: np.ndarray) -> float:
    if layer.kind == "embedding":  # canonical [D, V]: the used rows are columns
        ids = x if x is not None else np.arange(w.shape[1])
        return _sqnr_db(w[:, ids], wq[:, ids])
    if x is None:
        return _sqnr_db(w, wq)
    return _sqnr_db(x @ w, x @ wq)


def _exmy(w: np.ndarray, x: np.ndarray, st) -> dict:
    """Local SQNR (dB) of the ExMy formats for the weights (per-channel, absmax scale) and the input
    (per-tensor, MSE clip from the calibration histogram); the deployable E4M3FN/E5M2 too."""
    from lpcompile.formats import FP8_E4M3, FP8_E5M2

    ref = x @ w
    out = {"weights_db": {}, "activations_db": {}}
    formats = [(f"e{e}m{m}", fp8_exmy(e, m)) for e, m in EXMY]
    for name, fmt in formats + [("e4m3fn", FP8_E4M3), ("e5m2-ieee", FP8_E5M2)]:
        wspec = QuantSpec(fmt, PerChannel(1), True)
        wq = quantize_weight(w, wspec, "rtn").dequantize()
        out["weights_db"][name] = _sqnr_db(ref, x @ wq)
        if st is not None:
            aspec = QuantSpec(fmt, PerTensor(), True, scale_method="mse")
            out["activations_db"][name] = _sqnr_db(ref, fake_quantize_activation(x, aspec, st) @ w)
    # The deployable names map onto what ONNX runs: E4M3FN and IEEE E5M2.
    for side in ("weights_db", "activations_db"):
        d = out[side]
        if d:
            d["e4m3"], d["e5m2"] = d.pop("e4m3fn"), d.pop("e5m2-ieee")
            exmy_only = {k: v for k, v in d.items() if k in {f"e{e}m{m}" for e, m in EXMY}}
            best = max(exmy_only, key=exmy_only.get)
            deploy = max(("e4m3", "e5m2"), key=d.get)
            out[side.replace("_db", "_best")] = {"exmy": best, "deployable": deploy,
                                                 "gap_db": exmy_only[best] - d[deploy]}
    return out


def _outliers(st, x: np.ndarray) -> dict:
    """Outlier severity of a layer input: kurtosis of its values and largest/median channel max
    (from the captured rows and the calibration per-channel max)."""
    x64 = x.astype(np.float64)
    mu, var = x64.mean(), x64.var()
    kurt = float(((x64 - mu) ** 4).mean() / var**2) if var > 0 else float("nan")
    cmax = st.channel_absmax if st is not None and st.channel_absmax is not None else np.abs(x).max(axis=0)
    med = float(np.median(cmax))
    return {"kurtosis": kurt, "max_to_median": float(cmax.max() / med) if med > 0 else float("inf")}


def _end_to_end(model, layers, calibration, batches, acts, weight_q, sens, progress) -> None:
    """Fill `e2e_weights` / `e2e_activations` of every layer: output error with only that layer
    (weights, or input) quantized, on `batches`. Weights: one session of the float model with
    overridable weights. Activations: one session per candidate spec, in which every layer input
    has that spec's QDQ behind a `Where` switched by the layer's selector (only one QDQ per input:
    onnxruntime evaluates both branches of a Where)."""
    jobs = []  # (result dict, key, session index, extra feeds)
    sessions = [_sensitivity_model(model, layers, calibration, None)]
    for layer in layers:
        s = sens[layer.name]
        s["e2e_weights"], s["e2e_activations"] = {}, {}
        for spec_s in s["weights"]:
            spec = str(QuantSpec.parse(spec_s))
            jobs.append((s["e2e_weights"], spec, 0, {sessions[0][1][layer.name]: weight_q[(layer.name, spec)]}))
    for a in acts:
        probe, _, selectors = _sensitivity_model(model, layers, calibration, a)
        if not selectors:
            continue
        sessions.append((probe, {}, selectors))
        for layer in layers:
            if layer.name in selectors and "local_activations" in sens[layer.name]:
                jobs.append((sens[layer.name]["e2e_activations"], str(a), len(sessions) - 1,
                             {selectors[layer.name]: np.array(True)}))
    runners = [OrtRunner(probe) for probe, _, _ in sessions]
    out_name = runners[0].session.get_outputs()[0].name
    feeds = [{k: v for k, v in b.items() if k in runners[0].input_names} for b in batches]
    reference = [runners[0].session.run([out_name], f)[0] for f in feeds]
    for i, (target, key, which, extra) in enumerate(jobs):
        err = _OutputError()
        for f, ref in zip(feeds, reference):
            err.add(ref, runners[which].session.run([out_name], {**f, **extra})[0])
        target[key] = err.result()
        if progress:
            progress("select: end-to-end", i + 1, len(jobs))


def _sensitivity_model(model, layers, calibration, spec: QuantSpec | None):
    """A copy of `model` for end-to-end sensitivity. `spec` None: each layer's weight becomes an
    overridable input (an initializer that is also a graph input; its own copy where layers
    share one). Else each layer input passes `Where(selector, QDQ_spec(x), x)`, the selector an
    overridable int64 scalar (default 0 = float). Returns (model, layer -> weight input,
    layer -> selector name)."""
    from lpcompile.ir import upgrade_opset
    from lpcompile.passes.quantize import QDQ_OPSET

    probe = ir.from_proto(ir.to_proto(model))
    upgrade_opset(probe, QDQ_OPSET)
    graph = probe.graph
    probe_layers = {l.name: l for l in find_linear_layers(graph)}
    weight_inputs, selectors = {}, {}
    used_weights: set[str] = set()
    qdq_cache: dict[str, ir.Value] = {}
    for i, name in enumerate(l.name for l in layers):
        layer = probe_layers[name]
        if spec is None:
            w = layer.weight
            if w.name in used_weights or w.is_graph_input():
                copy = ir.Value(name=f"{w.name}__select{i}", const_value=w.const_value)
                copy.dtype, copy.shape = w.dtype, w.shape
                graph.register_initializer(copy)
                layer.node.replace_input_with(0 if layer.kind == "embedding" else 1, copy)
                w = copy
            used_weights.add(w.name)
            w.dtype = w.dtype or w.const_value.dtype  # a graph input needs its type spelled out
            w.shape = w.shape or ir.Shape(w.const_value.shape)
            graph.inputs.append(w)
            weight_inputs[name] = w.name
            continue
        x = layer.activation
        if layer.kind == "embedding" or x is None or not spec.dynamic and x.name not in calibration.stats:
            continue
        if layer.kind == "conv" and spec.dynamic:  # per-token scales are not a conv's (plan._fit_conv)
            continue
        sel = ir.Value(name=f"lpcompile_select_{i}",
                       const_value=ir.Tensor(np.array(False), name=f"lpcompile_select_{i}"))
        sel.dtype, sel.shape = ir.DataType.BOOL, ir.Shape([])
        graph.register_initializer(sel)
        graph.inputs.append(sel)
        if x.name not in qdq_cache:
            qdq_cache[x.name] = insert_activation_qdq(probe, layer, spec, calibration)
        where = ir.node("Where", [sel, qdq_cache[x.name], x], name=f"{sel.name}_where")
        where.outputs[0].name = f"{sel.name}_x"
        where.outputs[0].dtype, where.outputs[0].shape = x.dtype or ir.DataType.FLOAT, x.shape
        graph.insert_before(layer.node, where)
        layer.node.replace_input_with(0, where.outputs[0])
        selectors[name] = sel.name
    graph.sort()
    return probe, weight_inputs, selectors
