"""select: the solver against brute force, the cost model against the bytes Quantize writes, the
sensitivity measurements against onnxruntime on independently quantized models, and the plan."""

import dataclasses
import itertools
import json
import struct
import zlib

import numpy as np
import onnx_ir as ir
import pytest

from lpcompile.calibration_data import as_calibration_data
from lpcompile.errors import LpcompileError
from lpcompile.formats import QuantSpec
from lpcompile.ir.patterns import find_linear_layers
from lpcompile.passes.calibrate import CALIBRATION_KEY, Calibrate
from lpcompile.goals import Bits, Latency, MinCosine, from_flags
from lpcompile.passes.quantize import Quantize, UniformPlan
from lpcompile.passes.select import Select
from lpcompile.plan import PLAN_KEY, LayerChoice, Plan, weight_bits
from lpcompile.solver import solve_budget, solve_error
from lpcompile.report import quantized_layers, weight_bytes
from tests.conftest import mlp_model, ort_run, sqnr_db


def _instance(rng, groups, options, integer=True):
    costs = [sorted(rng.integers(1, 20, options).tolist()) if integer else sorted(rng.uniform(1, 20, options))
             for _ in range(groups)]
    # more bits, less error (plus some dominated options)
    errors = [sorted(rng.uniform(0, 1, options).tolist(), reverse=True) for _ in range(groups)]
    for e in errors:
        e[rng.integers(options)] += rng.uniform(0, 1)
    return costs, errors


def _brute(costs, errors, ok, key):
    best = None
    for choice in itertools.product(*(range(len(c)) for c in costs)):
        c = sum(costs[i][j] for i, j in enumerate(choice))
        e = sum(errors[i][j] for i, j in enumerate(choice))
        if ok(c, e) and (best is None or key(c, e) < key(*best)):
            best = (c, e)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_budget_solver_is_exact_on_integer_costs(seed):
    rng = np.random.default_rng(seed)
    costs, errors = _instance(rng, groups=int(rng.integers(2, 6)), options=int(rng.integers(2, 5)))
    budget = int(rng.integers(sum(min(c) for c in costs), sum(max(c) for c in costs) + 1))
    choice = solve_budget(costs, errors, budget, resolution=budget)
    cost = sum(costs[i][j] for i, j in enumerate(choice))
    err = sum(errors[i][j] for i, j in enumerate(choice))
    _, best_err = _brute(costs, errors, lambda c, e: c <= budget, lambda c, e: e)
    assert cost <= budget
    assert err == pytest.approx(best_err, abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_budget_solver_with_real_costs_meets_the_budget_and_is_near_optimal(seed):
    rng = np.random.default_rng(100 + seed)
    costs, errors = _instance(rng, groups=5, options=4, integer=False)
    budget = float(rng.uniform(sum(min(c) for c in costs), sum(max(c) for c in costs)))
    resolution = 256
    choice = solve_budget(costs, errors, budget, resolution)
    cost = sum(costs[i][j] for i, j in enumerate(choice))
    err = sum(errors[i][j] for i, j in enumerate(choice))
    assert cost <= budget
    best = _brute(costs, errors, lambda c, e: c <= budget, lambda c, e: e)[1]
    # rounding costs up loses at most one unit per group of the budget
    slack = _brute(costs, errors, lambda c, e: c <= budget - len(costs) * budget / resolution, lambda c, e: e)
    assert best - 1e-12 <= err <= (slack[1] if slack else np.inf) + 1e-12


@pytest.mark.parametrize("seed", range(8))
def test_error_solver_finds_the_cheapest_plan_under_an_error_target(seed):
    rng = np.random.default_rng(200 + seed)
    costs, errors = _instance(rng, groups=4, options=4)
    lo, hi = sum(min(e) for e in errors), sum(max(e) for e in errors)
    target = float(rng.uniform(lo, hi))
    choice = solve_error(costs, errors, target, resolution=4096)
    cost = sum(costs[i][j] for i, j in enumerate(choice))
    err = sum(errors[i][j] for i, j in enumerate(choice))
    best_cost, _ = _brute(costs, errors, lambda c, e: e <= target, lambda c, e: (c, e))
    assert err <= target
    assert cost == best_cost  # integer costs, fine resolution: exact


def test_a_budget_of_exactly_the_cheapest_real_valued_plan_gets_it():
    """(Real costs whose cheapest options sum to the budget: rounding each up used to make the
    instance infeasible at every resolution, MiniLM's latency budget equal to uniform W8A8.)"""
    rng = np.random.default_rng(7)
    costs = [sorted(rng.uniform(1, 20, 4).tolist()) for _ in range(33)]
    errors = [sorted(rng.uniform(0, 1, 4).tolist(), reverse=True) for _ in range(33)]
    assert solve_budget(costs, errors, sum(c[0] for c in costs)) == [0] * 33
    one_more = sum(c[0] for c in costs) + (costs[5][1] - costs[5][0])
    more = solve_budget(costs, errors, one_more)
    assert sum(c[j] for c, j in zip(costs, more)) <= one_more and more != [0] * 33


def test_infeasible_goals_are_named_errors():
    with pytest.raises(LpcompileError, match="below the smallest achievable"):
        solve_budget([[4, 8], [4, 8]], [[1, 0], [1, 0]], 7)
    with pytest.raises(LpcompileError, match="below the smallest achievable"):
        solve_error([[4, 8]], [[1.0, 0.5]], 0.1)
    with pytest.raises(LpcompileError, match="select needs a goal"):
        Select(None, 4.5)
    with pytest.raises(LpcompileError, match="bit width"):
        Bits(0.5)
    with pytest.raises(LpcompileError, match=r"\(0, 1\)"):
        MinCosine(1.2)
    with pytest.raises(LpcompileError, match="finite number"):
        Bits(float("nan"))


@pytest.mark.parametrize("spec", ["int4:block(0,128):sym", "int4:channel(1):sym", "int8:channel(1):sym",
                                  "uint4:block(0,32):asym", "fp8_e4m3:channel(1):sym"])
def test_weight_bits_are_the_bits_quantize_stores(spec):
    model = mlp_model()
    UniformPlan(QuantSpec.parse(spec), method="rtn")(model)
    Quantize()(model)
    shapes = {l.name: (l.in_features, l.out_features) for l in find_linear_layers(mlp_model().graph)}
    for node in quantized_layers(model):
        k, n = shapes[node.metadata_props["lpcompile.layer"]]
        assert weight_bytes(model, node)[1] * 8 == weight_bits(QuantSpec.parse(spec), k, n)
    assert weight_bits(None, 3, 5) == 32 * 15


# --- the pass on a small model ---------------------------------------------------------------------


def _calibrated(seed=0, samples=32):
    model = mlp_model()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, 8, 256)).astype(np.float32)
    x[..., :4] *= 30.0  # outlier input channels for the first layer
    data = as_calibration_data([{"x": x[i : i + 8]} for i in range(0, samples, 8)], model)
    Calibrate(data, 8, None)(model)
    return model, data, x


@pytest.fixture(scope="module")
def selected():
    model, data, x = _calibrated()
    result = Select(data, Bits(6.0), activations=(None, "int8:token:sym:dynamic"))(model)
    assert result.modified is False
    return model, data, x, model.meta[PLAN_KEY]


def _only(model, choice: LayerChoice):
    """`model` (calibrated, float) with only the layer of `choice` quantized by Quantize, as QDQ."""
    copy = ir.from_proto(ir.to_proto(model))
    copy.meta[CALIBRATION_KEY] = model.meta[CALIBRATION_KEY]
    Quantize(Plan([choice]))(copy)
    return copy


@pytest.mark.parametrize("layer", ["w1", "w2", "w3"])
def test_end_to_end_sensitivity_matches_onnxruntime_on_the_quantized_model(selected, layer):
    model, data, x, plan = selected
    sens = plan.sensitivity[layer]
    ref = ort_run(model, {"x": x})[0]
    for spec in ("int4:channel(1):sym", "int8:channel(1):sym"):
        got = ort_run(_only(model, LayerChoice(layer, QuantSpec.parse(spec), None, "gptq")), {"x": x})[0]
        assert sens["e2e_weights"][spec]["sqnr_db"] == pytest.approx(sqnr_db(ref, got), abs=0.02)
    for spec in ("int8:token:sym:dynamic", "fp8_e4m3:tensor:sym:mse", "uint8:tensor:asym"):
        got = ort_run(_only(model, LayerChoice(layer, None, QuantSpec.parse(spec))), {"x": x})[0]
        assert sens["e2e_activations"][spec]["sqnr_db"] == pytest.approx(sqnr_db(ref, got), abs=0.02)


def test_plan_meets_the_budget_and_records_why(selected):
    model, data, x, plan = selected
    params = sum(c.shape[0] * c.shape[1] for c in plan.layers)
    assert sum(c.bits for c in plan.layers) <= 6.0 * params
    assert plan.totals["avg_weight_bits"] <= 6.0
    assert [c.name for c in plan.layers] == ["w1", "w2", "w3"]
    for c in plan.layers:
        assert c.reason and c.predicted["nsr"] >= 0
        assert c.activations is None  # int8 activations cost no weight bits: only error
    # the ExMy analysis covers every dense layer; the first input has the planted outliers
    sens = plan.sensitivity
    assert set(sens["w1"]["exmy"]["activations_db"]) == {"e2m5", "e3m4", "e4m3", "e5m2"}
    assert sens["w1"]["outliers"]["max_to_median"] > 10 > sens["w2"]["outliers"]["max_to_median"]


def test_materialized_plan_costs_what_was_budgeted(selected):
    model, data, x, plan = selected
    qdq = ir.from_proto(ir.to_proto(model))
    qdq.meta[CALIBRATION_KEY] = model.meta[CALIBRATION_KEY]
    Quantize(plan)(qdq)
    stored = {n.metadata_props["lpcompile.layer"]: weight_bytes(qdq, n)[1] * 8 for n in quantized_layers(qdq)}
    for c in plan.layers:
        assert stored.get(c.name, c.bits if c.weights is None else None) == c.bits


def test_pins_are_respected_and_charged(selected):
    model, data, x, _ = selected
    pins = {"w1": {"weights": "int8:channel(1):sym", "activations": "float"}, "w[23]": {"weights": "float"}}
    Select(data, Bits(24.0), plan=Plan([], pins=pins))(model)
    plan = model.meta[PLAN_KEY]
    got = {c.name: (str(c.weights), c.pinned) for c in plan.layers}
    assert got == {"w1": ("int8:channel(1):sym", True), "w2": ("None", True), "w3": ("None", True)}
    # a pin to a format that is not a candidate: allowed, its error unknown (and said so)
    Select(data, Bits(24.0), plan=Plan([], pins={"w1": {"weights": "int4:block(0,32):sym", "method": "rtn"}}))(model)
    w1 = model.meta[PLAN_KEY].layers[0]
    assert (str(w1.weights), w1.method, w1.pinned) == ("int4:block(0,32):sym", "rtn", True)
    assert model.meta[PLAN_KEY].totals["unmeasured_pins"] == ["w1"]
    with pytest.raises(LpcompileError, match="below the smallest achievable 23.3"):
        Select(data, Bits(8.0), plan=Plan([], pins=pins))(model)


def test_plan_json_round_trip_and_pins_on_reuse(selected, tmp_path):
    _, _, _, plan = selected
    path = tmp_path / "plan.json"
    plan.save(path)
    again = Plan.load(path)
    assert [c.to_json() for c in again.layers] == [c.to_json() for c in plan.layers]
    assert again.budget == plan.budget
    data = json.loads(path.read_text())
    data["pins"] = {"w*": {"weights": "int4:block(0,128):sym"}}
    edited = Plan.from_json(data).with_pins_applied()
    assert {str(c.weights) for c in edited.layers} == {"int4:block(0,128):sym"}
    assert all(c.bits == weight_bits(c.weights, *c.shape) for c in edited.layers)


def test_bad_plan_files_are_one_line_errors(tmp_path):
    with pytest.raises(LpcompileError, match="not found"):
        Plan.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(LpcompileError, match="not JSON"):
        Plan.load(tmp_path / "bad.json")
    with pytest.raises(LpcompileError, match="plan: .*nonsense"):
        Plan.from_json({"layers": [{"name": "w1", "weights": "nonsense:tensor:sym"}]})
    with pytest.raises(LpcompileError, match="plan: malformed"):
        Plan.from_json({"layers": [{"weights": "int8:tensor:sym"}]})


def test_select_chart_is_a_valid_png(selected, tmp_path):
    from lpcompile.chart import write_select_chart
    from lpcompile.report import select_report

    model, data, x, plan = selected
    report = {"layers": [], "totals": {"output_sqnr_db": 30.0, "output_cosine": 0.99}}
    sel = select_report(plan, report, find_linear_layers(model.graph))
    write_select_chart(sel, tmp_path / "c.png")
    raw = (tmp_path / "c.png").read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", raw[16:24])
    idat = raw[raw.index(b"IDAT") + 4 : raw.index(b"IEND") - 8]
    assert len(zlib.decompress(idat)) == h * (1 + 3 * w)


def test_measurements_are_cached_in_the_plan_and_reused_for_a_new_goal(selected, tmp_path):
    model, data, x, plan = selected
    plan.save(tmp_path / "plan.json")
    reused = Plan.load(tmp_path / "plan.json")
    Select(data, Bits(4.2), activations=(None, "int8:token:sym:dynamic"), plan=reused)(model)
    again = model.meta[PLAN_KEY]
    assert again.totals["sensitivity_cached"] and again.totals["avg_weight_bits"] <= 4.2
    assert again.sensitivity["w2"]["e2e_weights"] == plan.sensitivity["w2"]["e2e_weights"]
    # other measurement settings: measured afresh
    Select(data, Bits(4.2), samples=16, plan=reused)(model)
    assert not model.meta[PLAN_KEY].totals["sensitivity_cached"]


@pytest.mark.parametrize("spec", ["int8:token:sym:dynamic", "int4:token:sym:dynamic", "uint8:tensor:asym",
                                  "fp8_e4m3:tensor:sym:mse", "fp8_e5m2:tensor:sym:mse"])
def test_numpy_activation_quantization_is_what_onnxruntime_computes(spec):
    """The layer-local numbers rest on fake_quantize_activation: it must equal the QDQ graph."""
    import onnx

    from lpcompile.passes.select import fake_quantize_activation

    model, _, x = _calibrated()
    stats = model.meta[CALIBRATION_KEY].stats["x"]
    Quantize(Plan([LayerChoice("w1", None, QuantSpec.parse(spec))]))(model)
    proto = ir.to_proto(model)
    proto.graph.output.append(onnx.ValueInfoProto(name="x_qdq"))
    got = ort_run(proto, {"x": x})[1]
    np.testing.assert_allclose(fake_quantize_activation(x, QuantSpec.parse(spec), stats), got, rtol=1e-6, atol=1e-6)


# --- the latency budget (costs as data: what the backend measured) --------------------------------


def _latency_table(plan, rng, drop=()):
    """Made-up kernel microseconds for every option of every layer (faster for fewer bits, float
    slowest), with the (layer, option key) pairs in `drop` left out (no native kernel)."""
    from lpcompile.passes.select import LatencyCosts, option_key

    per_layer = {}
    for name, s in plan.sensitivity.items():
        if name.startswith("@"):
            continue
        k, n = s["shape"]
        table = {}
        for w in [*s["weights"], None]:
            for a in (None, "int8:token:sym:dynamic"):
                ws, as_ = (QuantSpec.parse(w) if w else None), (QuantSpec.parse(a) if a else None)
                bits = weight_bits(ws, k, n) / (k * n)
                table[option_key(ws, as_)] = float(bits * rng.uniform(0.8, 1.2) + (-1.5 if a else 0.0) + 2.0)
        per_layer[name] = {key: v for key, v in table.items() if (name, key) not in drop}
    return LatencyCosts(per_layer, tokens=1, target="test")


def _brute_latency(select, layers, sens, costs):
    from lpcompile.passes.select import _e2e

    groups = [select.options(l, sens[l.name]) for l in layers]
    best = None
    for choice in itertools.product(*(range(len(g)) for g in groups)):
        picks = [g[j] for g, j in zip(groups, choice)]
        us = sum(costs.of(l.name, w, a) for l, (w, a) in zip(layers, picks))
        err = sum(_e2e(sens[l.name], w, a, "nsr") for l, (w, a) in zip(layers, picks))
        if us <= select.goal.value and (best is None or err < best):
            best = err
    return best


@pytest.mark.parametrize("seed", range(4))
def test_latency_budget_is_met_by_the_exact_knapsack(selected, seed):
    model, data, x, plan = selected
    rng = np.random.default_rng(300 + seed)
    costs = _latency_table(plan, rng)
    layers = find_linear_layers(model.graph)
    fastest = sum(min(costs.per_layer[l.name].values()) for l in layers)
    slowest = sum(max(costs.per_layer[l.name].values()) for l in layers)
    budget = float(rng.uniform(fastest, 0.5 * (fastest + slowest)))
    select = Select(data, Latency(budget), latency=costs, activations=(None, "int8:token:sym:dynamic"))
    got = select.solve(layers, plan.sensitivity)
    assert got.budget == {"kind": "latency", "value": budget, "unit": "us", "tokens": 1}
    spent = sum(c.latency_us for c in got.layers)
    assert spent <= budget and got.totals["latency_us"] == pytest.approx(spent)
    assert got.totals["predicted_nsr"] <= _brute_latency(select, layers, plan.sensitivity, costs) * (1 + 1e-3) + 1e-15
    assert json.loads(json.dumps(got.to_json()))["layers"][0]["latency_us"] == got.layers[0].latency_us


def test_latency_budget_skips_options_without_a_kernel_and_names_errors(selected):
    from lpcompile.errors import PassError
    from lpcompile.passes.select import option_key

    model, data, x, plan = selected
    layers = find_linear_layers(model.graph)
    acts = (None, "int8:token:sym:dynamic")
    w8a8 = option_key(QuantSpec.parse("int8:channel(1):sym"), QuantSpec.parse("int8:token:sym:dynamic"))
    costs = _latency_table(plan, np.random.default_rng(0), drop={(l.name, w8a8) for l in layers})
    generous = sum(max(t.values()) for t in costs.per_layer.values()) * 2
    got = Select(data, Latency(generous), latency=costs, activations=acts).solve(layers, plan.sensitivity)
    assert all(option_key(c.weights, c.activations) != w8a8 for c in got.layers)
    assert all(c.latency_us is not None for c in got.layers)
    # a pin to an option with no kernel cannot be budgeted
    pins = {"w2": {"weights": "int8:channel(1):sym", "activations": "int8:token:sym:dynamic"}}
    with pytest.raises(LpcompileError, match="w2: its pinned format has no native kernel"):
        Select(data, Latency(generous), latency=costs, activations=acts,
               plan=Plan([], pins=pins)).solve(layers, plan.sensitivity)
    bare = dataclasses.replace(costs, per_layer={**costs.per_layer, "w3": {}})
    with pytest.raises(LpcompileError, match="w3: no candidate format has a native kernel"):
        Select(data, Latency(generous), latency=bare, activations=acts).solve(layers, plan.sensitivity)
    fastest = sum(min(t.values()) for t in costs.per_layer.values())
    with pytest.raises(LpcompileError, match=f"below the fastest achievable {fastest:.1f} us"):
        Select(data, Latency(fastest * 0.9), latency=costs, activations=acts).solve(layers, plan.sensitivity)
    with pytest.raises(LpcompileError, match="positive number of microseconds"):
        Latency(0.0)
    with pytest.raises(LpcompileError, match="one goal at a time"):
        from_flags({"budget": 4.0, "budget_latency": 10.0})
    with pytest.raises(PassError, match="needs the backend's kernel latencies"):
        Select(data, Latency(10.0))(model)


def test_any_goal_reports_the_latency_it_was_given(selected):
    model, data, x, plan = selected
    costs = _latency_table(plan, np.random.default_rng(1))
    got = Select(data, Bits(6.0), latency=costs).solve(find_linear_layers(model.graph), plan.sensitivity)
    assert got.totals["latency_us"] == pytest.approx(sum(costs.of(c.name, c.weights, c.activations) for c in got.layers))
    assert got.totals["latency"]["layers_timed"] == 3 and got.totals["latency"]["untimed"] == []
