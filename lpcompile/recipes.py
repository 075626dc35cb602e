"""Named recipes: what `--format` means. A recipe is data (specs for weights, activations and
embedding tables plus the weight method), never a code path of its own."""

from __future__ import annotations

from dataclasses import dataclass

from lpcompile.errors import FormatError
from lpcompile.formats import QuantSpec


@dataclass(frozen=True)
class Recipe:
    name: str
    weights: QuantSpec
    activations: QuantSpec | None
    embeddings: QuantSpec | None
    method: str  # "rtn" | "mse" | "gptq"
    description: str

    @property
    def needs_calibration(self) -> bool:
        """Static activation scales and GPTQ both need calibration data."""
        return self.method == "gptq" or (self.activations is not None and not self.activations.dynamic)


def _r(name, weights, activations, embeddings, method, description) -> Recipe:
    p = QuantSpec.parse
    return Recipe(name, p(weights), p(activations) if activations else None, p(embeddings) if embeddings else None,
                  method, description)


# Weight layouts are canonical [K (in), N (out)]: block(0,128) = 128 input features per scale.
RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        _r("int4", "int4:block(0,128):sym", None, "int4:block(0,128):sym", "gptq",
           "W4A16: int4 weights, blocks of 128, GPTQ; float activations"),
        _r("w8a16", "int8:channel(1):sym", None, "int8:channel(1):sym", "mse",
           "W8A16: per-channel int8 weights; float activations"),
        _r("int8", "int8:channel(1):sym", "int8:tensor:sym:percentile(99.999)", "int8:channel(1):sym", "mse",
           "W8A8: per-channel int8 weights, static per-tensor int8 activations"),
        _r("w4a8", "int4:block(0,128):sym", "int8:token:sym:dynamic", "int4:block(0,128):sym", "gptq",
           "W4A8: int4 weights (GPTQ), dynamic per-token int8 activations"),
        _r("fp8", "fp8_e4m3:channel(1):sym", "fp8_e4m3:tensor:sym", "fp8_e4m3:channel(1):sym", "mse",
           "FP8 E4M3 weights (per-channel) and static per-tensor E4M3 activations"),
        _r("fp8-e5m2", "fp8_e5m2:channel(1):sym", "fp8_e5m2:tensor:sym", "fp8_e5m2:channel(1):sym", "mse",
           "FP8 E5M2 weights (per-channel) and static per-tensor E5M2 activations"),
    )
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise FormatError(f"unknown format {name!r}; choose one of: {', '.join(RECIPES)}") from None
