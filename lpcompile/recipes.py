"""Named recipes: what `--format` means. A recipe is data (specs for weights, activations and
embedding tables plus the weight method), never a code path of its own."""

from __future__ import annotations

from dataclasses import dataclass

from lpcompile.errors import FormatError
from lpcompile.formats import IntFormat, QuantSpec


@dataclass(frozen=True)
class Recipe:
    name: str
    weights: QuantSpec
    activations: QuantSpec | None
    embeddings: QuantSpec | None
    method: str  # "rtn" | "mse" | "gptq"
    description: str

    @property
    def default_rotate(self) -> str:
        """Rotation pays where outliers hurt integer grids: integer activations of 8 bits or fewer,
        or 4-bit weights. Float formats are scale-invariant and lose from it (MiniLM held-out
        cosine, fp8 E4M3: 0.9983 without, 0.9976 with; E5M2: 0.9934 vs 0.9906), so they default off."""
        int_acts = self.activations is not None and isinstance(self.activations.format, IntFormat)
        low_acts = int_acts and self.activations.format.bits <= 8
        return "auto" if low_acts or self.weights.format.bits <= 4 else "off"

    @property
    def default_smooth(self) -> str:
        """SmoothQuant (`lpcompile.passes.smooth`) is off by default (see README: measured per recipe)."""
        return "off"

    def format_names(self) -> set[str]:
        """The number formats this recipe uses (`lpcompile.formats` names), for target checks."""
        return {s.format.name for s in (self.weights, self.activations, self.embeddings) if s is not None}

    @property
    def needs_calibration(self) -> bool:
        """Static activation scales need calibration data (GPTQ uses it when given, else MSE)."""
        return self.activations is not None and not self.activations.dynamic


def _r(name, weights, activations, embeddings, method, description) -> Recipe:
    p = QuantSpec.parse
    return Recipe(name, p(weights), p(activations) if activations else None, p(embeddings) if embeddings else None,
                  method, description)


# Embedding tables cannot be error-compensated (no input to spread the error over) and their rows
# are skewed: asymmetric uint4 in blocks of 32 along D. Measured on all-MiniLM-L6-v2 (tables only):
# cosine 0.9983 vs 0.9966 for int4 sym block 32 and 0.9930 for int4 sym block 128.
EMBEDDINGS_4BIT = "uint4:block(0,32):asym"

# Weight layouts are canonical [K (in), N (out)]: block(0,128) = 128 input features per scale.
RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        _r("int4", "int4:block(0,128):sym", None, EMBEDDINGS_4BIT, "gptq",
           "W4A16: int4 weights, blocks of 128, GPTQ; float activations"),
        _r("w8a16", "int8:channel(1):sym", None, "int8:channel(1):sym", "gptq",
           "W8A16: per-channel int8 weights (GPTQ); float activations"),
        _r("int8", "int8:channel(1):sym", "uint8:tensor:asym", "int8:channel(1):sym", "gptq",
           "W8A8: per-channel int8 weights (GPTQ), static per-tensor uint8 activations with zero point"),
        _r("w4a8", "int4:block(0,128):sym", "int8:token:sym:dynamic", EMBEDDINGS_4BIT, "gptq",
           "W4A8: int4 weights (GPTQ), dynamic per-token int8 activations"),
        _r("w4a4", "int4:channel(1):sym", "int4:token:sym:dynamic", EMBEDDINGS_4BIT, "gptq",
           "W4A4: int4 per-channel weights (GPTQ), dynamic per-token int4 activations; needs rotation"),
        _r("fp8", "fp8_e4m3:channel(1):sym", "fp8_e4m3:tensor:sym", "fp8_e4m3:channel(1):sym", "gptq",
           "FP8 E4M3 weights (per-channel, GPTQ) and static per-tensor E4M3 activations"),
        _r("fp8-e5m2", "fp8_e5m2:channel(1):sym", "fp8_e5m2:tensor:sym", "fp8_e5m2:channel(1):sym", "gptq",
           "FP8 E5M2 weights (per-channel, GPTQ) and static per-tensor E5M2 activations"),
    )
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise FormatError(f"unknown format {name!r}; choose one of: {', '.join(RECIPES)}") from None
