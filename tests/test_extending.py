"""A user extends lpcompile through its public API alone: a goal of their own (solved over the
measured Problem) and a pass of their own inserted into the pipeline compile() runs."""

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

import lpcompile
from lpcompile.goals import Goal
from lpcompile.pipeline import Pipeline
from tests.conftest import mlp_model


@dataclass(frozen=True)
class AtMostBitsPerLayer(Goal):
    """Every layer at most `value` bits per weight; among those, the least predicted output noise."""

    kind = "bits_per_layer"

    def solve(self, problem):
        picks = []
        for options, bits, nsr in zip(problem.options, problem.bits, problem.nsr):
            weights = [b / (bits[-1] / 32) for b in bits]  # bits per weight: the float option costs 32
            allowed = [j for j, w in enumerate(weights) if w <= self.value] or [int(np.argmin(weights))]
            picks.append(min(allowed, key=lambda j: nsr[j]))
        return picks

    def met(self, achieved):
        return None


@dataclass(frozen=True)
class TagGraph(ir.passes.InPlacePass):
    """A user's pass: leaves a mark on the model it saw (after quantize, before cleanup)."""

    def call(self, model):
        model.graph.metadata_props["seen_by"] = "TagGraph:" + ",".join(
            sorted(n.op_type for n in model.graph if n.op_type == "DequantizeLinear")[:1])
        return ir.passes.PassResult(model, modified=True)


def _calibration(n=4):
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((8, 8, 256)).astype(np.float32)} for _ in range(n)]


def test_a_users_goal_and_pass_through_the_public_api():
    seen: list[Pipeline] = []

    def edit(pipeline: Pipeline):
        pipeline.insert_after("quantize", TagGraph())
        seen.append(pipeline)

    art = lpcompile.compile(mlp_model(), format="auto", goal=AtMostBitsPerLayer(8.5), calibration=_calibration(),
                            rotate="off", edit_pipeline=edit)
    assert seen and seen[0].names().index("tag-graph") == seen[0].names().index("quantize") + 1
    assert art.report["pipeline"] == seen[0].names()
    assert art.qdq_model.graph.metadata_props["seen_by"] == "TagGraph:DequantizeLinear"
    # every layer got at most 8.5 bits per weight, and the plan records the user's goal
    for c in art.plan.layers:
        assert c.bits / (c.shape[0] * c.shape[1]) <= 8.5
    assert art.plan.budget == {"kind": "bits_per_layer", "value": 8.5}
    assert art.report["select"]["achieved"]["budget_met"] is None


def test_the_pipeline_a_recipe_builds_is_inspectable():
    names = []
    lpcompile.compile(mlp_model(), format="int8", calibration=_calibration(), rotate="off",
                      edit_pipeline=lambda p: names.extend(p.names()))
    assert names == ["keep-reference", "calibrate", "plan", "quantize", "cleanup"]
