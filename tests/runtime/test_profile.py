"""`lpcompile bench DIR --profile`: every kernel call of a run timed through the Relax VM's
instrument, by symbol and by op type (`lpcompile.runtime.profile`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tvm")

from lpcompile import runtime  # noqa: E402
from lpcompile.runtime.profile import OTHER, op_type, render  # noqa: E402


@pytest.fixture
def artifact(int8_artifact):
    return int8_artifact


def test_op_types_of_kernel_symbols():
    assert op_type("lp_matmul_uint8_int8_m_384_384_ch") == "quantized matmul"
    assert op_type("fused_matmul_multiply2_add7") == "float matmul (attention)"
    assert op_type("fused_layer_norm_multiply") == "layer norm"
    assert op_type("fused_add8_gelu") == "gelu / activation"
    assert op_type("vm.builtin.reshape") == "VM builtins (alloc, shapes)"  # not a layout kernel
    assert op_type("transpose2") == "layout (transpose / reshape)"
    assert op_type("fused_add6_add3") == OTHER


def test_profile_accounts_for_every_kernel_of_a_run(artifact):
    model = runtime.load(artifact)
    x = np.random.default_rng(1).standard_normal((2, 8, 256)).astype(np.float32)
    p = model.profile({"x": x}, repeat=3)
    assert p["input_shapes"] == {"x": [2, 8, 256]}
    kinds = {r["op_type"] for r in p["kernels"]}
    assert "quantized matmul" in kinds and "activation quantize" in kinds
    mm = [r for r in p["kernels"] if r["op_type"] == "quantized matmul"]
    linears = sum(1 for layer in model.manifest["layers"] if layer["op"] in ("MatMul", "Gemm"))
    assert sum(r["calls"] for r in mm) == linears  # one call per linear layer and run
    assert sum(e["ms"] for e in p["op_types"]) == pytest.approx(p["kernels_ms"], rel=1e-3)
    assert sum(e["share"] for e in p["op_types"]) == pytest.approx(1.0, abs=1e-2)
    assert 0 < p["kernels_ms"] <= p["instrumented_ms"]
    assert "quantized matmul" in render(p)
    y = model({"x": x})  # the instrument is gone: the model still runs, same numbers as before
    np.testing.assert_array_equal(y, model({"x": x}))


def test_cli_profile_prints_a_table_and_writes_a_new_json(artifact, tmp_path, capsys):
    from lpcompile.runtime.cli import main

    out = tmp_path / "prof.json"
    assert main(["bench", str(artifact), "--profile", "--repeat", "2", "--batch", "1", "--seq", "4",
                 "--profile-out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "op type" in table and "quantized matmul" in table
    saved = json.loads(out.read_text())
    assert saved["format"] == "int8" and saved["input_shapes"]["x"] == [1, 4, 256]
    before = out.read_text()
    assert main(["bench", str(artifact), "--profile", "--profile-out", str(out)]) == 2  # never overwritten
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and out.read_text() == before
    assert main(["bench", str(artifact), "--profile-out", str(tmp_path / "new.json")]) == 2
    assert "needs --profile" in capsys.readouterr().err
