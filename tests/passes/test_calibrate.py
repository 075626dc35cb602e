"""Calibrate is checked against numpy statistics of the intermediate tensors that onnxruntime
computes (the reference), on the very same batches."""

import numpy as np
import onnx
import pytest

from lpcompile.calibration_data import as_calibration_data
from lpcompile.errors import CalibrationError
from lpcompile.formats import INT8
from lpcompile.passes import Calibrate
from lpcompile.passes.calibrate import CALIBRATION_KEY
from tests.conftest import mlp_model, ort_run


def _reference_h2(model, batches):
    """The Relu output (input of the Gemm after reshape) computed by onnxruntime, all batches."""
    import onnx_ir as ir

    proto = ir.to_proto(model)
    proto.graph.output.append(onnx.ValueInfoProto(name="h2"))
    return np.concatenate([ort_run(proto, b)[1].reshape(-1, 384) for b in batches])


def test_statistics_match_numpy_on_onnxruntime_intermediates():
    model = mlp_model()
    rng = np.random.default_rng(3)
    batches = [{"x": (rng.standard_normal((4, 8, 256)) * (1 + i)).astype(np.float32)} for i in range(5)]
    data = as_calibration_data(batches, model)
    Calibrate(data, batch_size=4, gram_for=None)(model)
    cal = model.meta[CALIBRATION_KEY]
    assert cal.num_samples == 20 and not cal.is_random
    ref = _reference_h2(model, batches)
    st = cal.stats["h3"] if "h3" in cal.stats else None  # the Gemm reads the reshaped h2
    assert st is not None
    assert st.count == ref.shape[0]
    assert st.min == pytest.approx(ref.min()) and st.max == pytest.approx(ref.max())
    np.testing.assert_allclose(st.channel_absmax, np.abs(ref).max(axis=0), rtol=1e-6)
    np.testing.assert_allclose(st.gram, ref.astype(np.float64).T @ ref.astype(np.float64), rtol=1e-5, atol=1e-3)
    # the histogram widened 5 times as batches grew; its percentile is within one bin of numpy's
    bin_width = st.hist_range / len(st.hist)
    for p in (50.0, 99.0, 99.99):
        assert abs(st.percentile(p) - np.percentile(np.abs(ref), p, method="inverted_cdf")) <= bin_width * 1.01
    assert st.hist.sum() == ref.size


def test_mse_clip_beats_absmax_on_heavy_tails():
    model = mlp_model()
    rng = np.random.default_rng(0)
    x = rng.standard_t(df=2, size=(8, 8, 256)).astype(np.float32)
    Calibrate(as_calibration_data([{"x": x}], model))(model)
    st = model.meta[CALIBRATION_KEY].stats["x"]
    clip = st.mse_clip(INT8)
    assert 0 < clip < st.absmax

    def err(c):
        s = c / 127
        return float(((np.clip(np.rint(x / s), -127, 127) * s - x) ** 2).mean())

    assert err(clip) < err(st.absmax)


def test_bad_calibration_data_is_refused_with_a_reason(tmp_path):
    model = mlp_model()
    with pytest.raises(CalibrationError, match="NaN"):
        as_calibration_data([{"x": np.full((2, 8, 256), np.nan, np.float32)}], model)
    with pytest.raises(CalibrationError, match="missing model input"):
        as_calibration_data([{"y": np.zeros((2, 8, 256), np.float32)}], model)
    with pytest.raises(CalibrationError, match="rank"):
        as_calibration_data([{"x": np.zeros((2, 256), np.float32)}], model)
    with pytest.raises(CalibrationError, match="not found"):
        as_calibration_data(str(tmp_path / "nope.npz"), model)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match="cannot read"):
        as_calibration_data(str(tmp_path / "bad.npz"), model)
    with pytest.raises(CalibrationError, match="random:N"):
        as_calibration_data("random:zero", model)


def test_npz_file_directory_and_random_sources(tmp_path):
    model = mlp_model()
    rng = np.random.default_rng(0)
    for i in range(3):
        np.savez(tmp_path / f"part{i}.npz", x=rng.standard_normal((5, 8, 256)).astype(np.float32))
    d = as_calibration_data(str(tmp_path), model)
    assert d.num_samples == 15 and "3 files" in d.label
    assert sum(len(b["x"]) for b in d.batches(4)) == 15
    one = as_calibration_data(str(tmp_path / "part0.npz"), model)
    assert one.num_samples == 5
    r = as_calibration_data("random:6", model)
    assert r.is_random and "smoke run" in r.label
    (b,) = list(r.batches(8))
    assert b["x"].shape == (6, 16, 256) and b["x"].dtype == np.float32
