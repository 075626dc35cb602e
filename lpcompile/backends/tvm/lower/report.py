"""What a lowering did: which patterns fired, which matches were refused and why, and one record
per quantized layer (its kernel, or why it runs in float). Filled in by the converters through the
lowering context (`context`), returned by `importer.from_onnx`, written into an artifact's
manifest by `export`."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class LoweringReport:
    fired: Counter = field(default_factory=Counter)
    refused: Counter = field(default_factory=Counter)
    # per quantized-weight MatMul/Gemm node (ONNX node name): kernel, status, activation, reason
    layers: dict[str, dict] = field(default_factory=dict)

    def refuse(self, pattern: str, reason: str, node: str | None = None) -> None:
        log.debug("lower: %s not lowered: %s", pattern, reason)
        self.refused[f"{pattern}: {reason}"] += 1
        if node is not None:
            self.layers[node] = {"kernel": None, "status": "float fallback", "activation": "float32",
                                 "reason": f"{pattern}: {reason}; runs in float on the dequantized weights"}
