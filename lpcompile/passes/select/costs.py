"""select's candidates and costs: the formats each layer may take, how an option is named,
the kernel latencies the backend measured (`LatencyCosts`, data handed to the pass), and an
option's predicted output error from the measured sensitivities."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from lpcompile.formats import QuantSpec
from lpcompile.plan import spec_text

WEIGHT_CANDIDATES = ("int4:block(0,128):sym", "int4:channel(1):sym", "int8:channel(1):sym",
                     "fp8_e4m3:channel(1):sym", "fp8_e5m2:channel(1):sym")
EMBEDDING_CANDIDATES = ("uint4:block(0,32):asym", "int8:channel(1):sym", "fp8_e4m3:channel(1):sym",
                        "fp8_e5m2:channel(1):sym")
DEPLOYABLE_FP8 = ("fp8_e4m3", "fp8_e5m2")


def option_key(weights: QuantSpec | None, activations: QuantSpec | None) -> str:
    """How `LatencyCosts` names a layer's (weights, activations) option."""
    return f"{spec_text(weights)}|{spec_text(activations)}"


@dataclass(frozen=True)
class LatencyCosts:
    """Kernel latency per layer and option, as the backend measured it on the target.

    `per_layer[layer name][option_key(w, a)]`: microseconds of the layer's kernels (its matmul,
    and the kernel quantizing its input where that is quantized) at `tokens` rows; an option
    absent has no native kernel on `target` (not a candidate under a latency budget). A layer
    absent (an embedding table: a gather) costs nothing."""

    per_layer: Mapping[str, Mapping[str, float]]
    tokens: int = 1
    target: str = ""
    note: str = ""

    def of(self, name: str, weights: QuantSpec | None, activations: QuantSpec | None) -> float | None:
        return (self.per_layer.get(name) or {}).get(option_key(weights, activations))


def _e2e(s: dict, w: QuantSpec | None, a: QuantSpec | None, key: str) -> float:
    """Predicted output error of a (weights, activations) pair: the two measured errors added (a
    format that was not measured, which only a pin can bring, counts 0)."""
    total = 0.0
    if w is not None:
        total += s["e2e_weights"].get(str(w), {}).get(key, 0.0)
    if a is not None:
        total += s["e2e_activations"].get(str(a), {}).get(key, 0.0)
    return total


def _measured(s: dict, w: QuantSpec | None, a: QuantSpec | None) -> bool:
    return (w is None or str(w) in s["e2e_weights"]) and (a is None or str(a) in s["e2e_activations"])
