"""The zoo (issue 11 item 4): architectures people bring, built at test time from `transformers`
configs with random weights (nothing downloaded): a decoder with grouped key/value heads
(LLaMA), GPT-2, Qwen2, an encoder (BERT), a ViT, a ResNet, a MobileNetV2 and a ConvNeXt, each
x {int4, int8, fp8, w4a8}: compiled with symbolic batch (and sequence), the TVM artifact run at
two sizes against onnxruntime on the same saved QDQ model (the tolerances of
test_dynamic_decoders), and the manifest saying every quantized layer runs on a native kernel
(save test_dynamic_decoders.KNOWN_EMULATED: depthwise convolutions), no report warning (a
degenerate output would measure nothing), and convnets' whole-model bytes at about 1/4 (int8)
and below 1/5 (int4) of fp32.
The decoders and ConvNeXt are covered there; this file adds the rest. Slow: one TVM build each."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tvm")
pytest.importorskip("transformers")
pytest.importorskip("torch")

from models import hf_tiny  # noqa: E402
from tests.backends.test_dynamic_decoders import build_and_compare, exported  # noqa: E402,F401

pytestmark = pytest.mark.slow

ZOO_ONLY = hf_tiny.ENCODERS + hf_tiny.ZOO_IMAGES  # the others: test_dynamic_decoders


@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8", "w4a8"])
@pytest.mark.parametrize("name", ZOO_ONLY)
def test_zoo(exported, tmp_path, name, fmt):
    rows = build_and_compare(exported(name), name, fmt, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    t = report["totals"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    emulated = sum(layer["status"] != "native" for layer in manifest["layers"])  # known gaps only (see there)
    print(f"\n{name} {fmt}: {rows}; {t['layers_quantized']} layers ({emulated} emulated), whole model "
          f"{t['model_bytes'] / t['model_float_bytes']:.3f}x fp32, warnings {report['warnings']}")
    assert not report["warnings"], report["warnings"]
    if name in hf_tiny.ZOO_IMAGES and fmt in ("int8", "int4"):  # convolutions count: the whole model shrinks
        assert t["model_bytes"] < {"int8": 0.3, "int4": 0.2}[fmt] * t["model_float_bytes"], t
