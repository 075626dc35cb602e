from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def int8_artifact(tmp_path_factory):
    """The test MLP compiled for this CPU (int8: the W8A8 kernels), saved."""
    pytest.importorskip("tvm")
    import lpcompile
    from tests.conftest import mlp_model

    d = tmp_path_factory.mktemp("runtime")
    np.savez(d / "calib.npz", x=np.random.default_rng(0).standard_normal((16, 8, 256)).astype(np.float32))
    return lpcompile.compile(mlp_model(), format="int8", calibration=d / "calib.npz", emit=("onnx", "tvm")).save(d / "int8.lpc")
