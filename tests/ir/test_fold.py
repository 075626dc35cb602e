"""fold_weights: weights computed from constants (sparse layers' expansions) become initializers,
and the model computes the same in onnxruntime."""

import numpy as np
import pytest

from lpcompile.calibration_data import as_calibration_data
from lpcompile.formats import QuantSpec
from lpcompile.ir.fold import computed_weights, fold_weights
from lpcompile.passes import Calibrate, Quantize, UniformPlan
from lpcompile.passes.sparsify import Sparsify
from tests.conftest import mlp_model, ort_run


def _sparse(weights, pattern):
    model = mlp_model()
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((8, 8, 256)).astype(np.float32)} for _ in range(4)]
    Calibrate(as_calibration_data(calib, model), 8, None)(model)
    UniformPlan(QuantSpec.parse(weights) if weights else None, sparsity=pattern)(model)
    Sparsify()(model)
    Quantize()(model)
    return model


@pytest.mark.parametrize("weights, pattern", [(None, "2:4"), ("int8:channel(1):sym", "0.5"),
                                              ("int4:block(0,128):sym", "2:4"), ("fp8_e4m3:channel(1):sym", "4:8")])
def test_folded_model_computes_the_same_with_constant_weights(weights, pattern, mlp_inputs):
    model = _sparse(weights, pattern)
    assert len(computed_weights(model.graph)) == 3
    folded, count = fold_weights(model)
    assert count == 3 and not computed_weights(folded.graph)
    assert not any(n.domain == "ai.lpcompile" for n in folded.graph) and not folded.functions
    # onnxruntime prepacks constant MatMul weights (another summation order): fp32 rounding only
    np.testing.assert_allclose(ort_run(folded, mlp_inputs)[0], ort_run(model, mlp_inputs)[0], rtol=1e-5, atol=1e-5)
    assert len(computed_weights(model.graph)) == 3  # the model itself is untouched


def test_nothing_to_fold_returns_the_model(mlp):
    assert fold_weights(mlp) == (mlp, 0)
