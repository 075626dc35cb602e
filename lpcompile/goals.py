"""Goals: what `--format auto` optimises for, as values.

A goal is a small frozen object: it validates itself when made, says which input formats are
worth considering, checks before any measurement whether it can be met at all, and picks one
option per layer from a `Problem` (each layer's options with their weight bits, measured output
errors and, where timed, kernel latencies). `compile(format="auto", goal=...)`, the CLI and the
`select` pass all take a goal; adding one is a subclass here (its CLI flag in `FLAGS`) and a
line in the docs.

    Bits(4.5)                  average weight bits over the linear layers, scales included
    Bytes(12e6)                total weight bytes
    Latency(900, tokens=16)    sum of the layers' kernel microseconds, measured on the target
    MinCosine(0.995)           fewest bits whose mean output cosine is >= C (verified on held-out data)
    MinCosine(0.97, stat="min")   ... whose worst sample's cosine is >= C ("p5": the 5th percentile)

`tokens` (every goal): the rows at which layers with a symbolic row count are timed when the
chosen layers' latency is reported (1: a decode step).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from lpcompile.errors import LpcompileError
from lpcompile.solver import solve_budget, solve_error

__all__ = ["Goal", "Problem", "Bits", "Bytes", "Latency", "MinCosine", "FLAGS", "from_flags"]

# Input formats select may choose besides float when a goal rewards them (they cost no weight
# bits, only error; against a latency budget they buy the integer / fp8 kernels).
ACTIVATION_CANDIDATES = ("int8:token:sym:dynamic", "uint8:tensor:asym", "fp8_e4m3:tensor:sym:mse",
                         "fp8_e5m2:tensor:sym:mse", "int4:token:sym:dynamic")


@dataclass(frozen=True)
class Problem:
    """Per layer (in model order): its options [(weights, activations)], and per option the weight
    bits, the predicted output noise-to-signal ratio and cosine loss (None before measuring), and
    the kernel latency in microseconds (None where not timed). `params`: weights in all layers."""

    names: list[str]
    kinds: list[str]
    options: list[list[tuple]]
    bits: list[list[float]]
    nsr: list[list[float]] | None = None
    cosine_loss: list[list[float]] | None = None
    latency_us: list[list[float]] | None = None
    params: int = 0

    def cheapest_bits(self) -> float:
        return sum(min(b) for b in self.bits)


@dataclass(frozen=True)
class Goal(ABC):
    """One target for a per-layer choice. Subclasses set `kind` (plan.json's budget kind) and
    `unit`, and define `solve`."""

    value: float
    tokens: int = 1

    kind: ClassVar[str] = ""
    unit: ClassVar[str] = ""
    needs_latency: ClassVar[bool] = False  # select needs the backend's kernel latencies (LatencyCosts)
    holdout_every: ClassVar[int | None] = None  # verified on every n-th calibration batch, held out

    def __post_init__(self):
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise LpcompileError(f"{self.describe_kind()} must be a finite number, got {self.value!r}")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise LpcompileError(f"latency tokens must be a whole number of tokens >= 1, got {self.tokens!r}")
        self.check()

    def check(self) -> None:
        """Refuse a value that cannot be a goal of this kind (one line)."""

    @classmethod
    def describe_kind(cls) -> str:
        return cls.kind or cls.__name__

    def activation_candidates(self) -> tuple[str | None, ...]:
        """Input formats a plan for this goal may use (None: float). Quantized inputs cost no
        weight bits, only error, so only goals that reward them list them."""
        return (None,)

    def check_feasible(self, problem: Problem) -> None:
        """Before any measurement: refuse a goal that no choice of options can meet (one line)."""

    @abstractmethod
    def solve(self, problem: Problem) -> list[int]:
        """The index of the chosen option per layer."""

    def budget(self) -> dict:
        """The goal as plan.json records it."""
        out = {"kind": self.kind, "value": self.value}
        if self.unit:
            out["unit"] = self.unit
        return out

    def met(self, achieved: dict) -> bool | None:
        """Whether a QDQ model's achieved totals (avg_weight_bits, weight_bytes, output_cosine,
        latency_us) meet the goal."""
        return None

    def __str__(self) -> str:
        return f"{self.kind} {self.value:g}{' ' + self.unit if self.unit else ''}"


@dataclass(frozen=True)
class Bits(Goal):
    """Average weight bits over the linear layers (scales and zero points counted; float 32)."""

    kind: ClassVar[str] = "bits"

    def check(self):
        if not 1.0 <= self.value <= 32.0:
            raise LpcompileError(f"--budget {self.value:g} is not an average weight bit width in [1, 32]")

    def check_feasible(self, problem):
        cheapest = problem.cheapest_bits() / problem.params
        if cheapest > self.value:
            raise LpcompileError(f"--budget {self.value:g} bits per weight is below the smallest achievable "
                                 f"{cheapest:.4f} with these candidates and pins (float layers count 32)")

    def solve(self, problem):
        self.check_feasible(problem)
        return solve_budget(problem.bits, problem.nsr, self.value * problem.params)

    def met(self, achieved):
        return achieved["avg_weight_bits"] <= self.value + 1e-9


@dataclass(frozen=True)
class Bytes(Goal):
    """Total bytes of the linear weights and tables, scales included."""

    kind: ClassVar[str] = "bytes"

    def check(self):
        if self.value <= 0:
            raise LpcompileError(f"bytes budget {self.value:g} must be positive")

    def check_feasible(self, problem):
        cheapest = problem.cheapest_bits() / 8
        if cheapest > self.value:
            raise LpcompileError(f"--budget-bytes {self.value:g} is below the smallest achievable {cheapest:.0f} bytes "
                                 "with these candidates and pins (float layers count 4 bytes a weight)")

    def solve(self, problem):
        self.check_feasible(problem)
        return solve_budget(problem.bits, problem.nsr, self.value * 8)

    def met(self, achieved):
        return achieved["weight_bytes"] <= self.value


@dataclass(frozen=True)
class Latency(Goal):
    """Sum of the linear layers' kernel latencies in microseconds, as the backend measures them on
    the target at `tokens` rows (layers whose row count the model fixes: at that count)."""

    kind: ClassVar[str] = "latency"
    unit: ClassVar[str] = "us"
    needs_latency: ClassVar[bool] = True

    def check(self):
        if self.value <= 0:
            raise LpcompileError(f"latency budget {self.value:g} us must be a positive number of microseconds")

    def activation_candidates(self):
        return (None, *ACTIVATION_CANDIDATES)

    def check_feasible(self, problem):
        if problem.latency_us is None:
            return
        fastest = sum(min(m) for m in problem.latency_us)
        if fastest > self.value:
            raise LpcompileError(f"latency budget {self.value:g} us is below the fastest achievable {fastest:.1f} us "
                                 f"at {self.tokens} tokens with these candidates and pins")

    def solve(self, problem):
        if problem.latency_us is None:
            raise LpcompileError("a latency budget needs the backend's kernel latencies")
        self.check_feasible(problem)
        return solve_budget(problem.latency_us, problem.nsr, self.value)

    def budget(self):
        return {**super().budget(), "tokens": self.tokens}

    def met(self, achieved):
        return achieved.get("latency_us") is not None and achieved["latency_us"] <= self.value


@dataclass(frozen=True)
class MinCosine(Goal):
    """The fewest weight bits whose output cosine against float is >= value; the caller verifies
    it on calibration batches held out from fitting (every `holdout_every`-th). `stat`: which
    statistic of the per-sample cosines must reach it: "mean" (its 95% lower confidence bound
    when verified), "p5" (the 5th percentile) or "min" (the worst sample), so the tail can be the
    target, not only the mean."""

    stat: str = "mean"

    kind: ClassVar[str] = "min_cosine"
    holdout_every: ClassVar[int | None] = 4

    def check(self):
        if not 0.0 < self.value < 1.0:
            raise LpcompileError(f"--min-cosine {self.value:g} must lie in (0, 1)")
        if self.stat not in COSINE_STATS:
            raise LpcompileError(f"--cosine-stat {self.stat!r}: choose one of {', '.join(COSINE_STATS)}")

    def budget(self):
        return {**super().budget(), "stat": self.stat}

    def __str__(self) -> str:
        return f"{self.kind} {self.value:g} ({self.stat})"

    def solve(self, problem):
        return solve_error(problem.bits, problem.cosine_loss, 1.0 - self.value)

    def met(self, achieved):
        got = achieved.get(COSINE_STAT_KEYS[self.stat])
        return got is not None and got >= self.value


COSINE_STATS = ("mean", "p5", "min")
COSINE_STAT_KEYS = {"mean": "output_cosine", "p5": "output_cosine_p5", "min": "output_cosine_min"}


# The CLI's goal flags: flag -> (goal class, metavar, help). The CLI adds these to its parser and
# maps them back through `from_flags`; a new goal adds its line here.
FLAGS: dict[str, tuple[type[Goal], str, str]] = {
    "--budget": (Bits, "BITS", "average bits per weight over the linear layers, scales included (e.g. 4.5)"),
    "--budget-bytes": (Bytes, "BYTES", "total bytes of the linear weights and tables, scales included"),
    "--budget-latency": (Latency, "MICROSECONDS",
                         "sum of the linear layers' kernel latencies, measured on the target (this CPU, or a CUDA "
                         "GPU present here) once per kernel shape and cached in $LPCOMPILE_CACHE "
                         "(default ~/.cache/lpcompile)"),
    "--min-cosine": (MinCosine, "C", "fewest bits whose mean output cosine is >= C on calibration batches held out "
                                     "from fitting (every fourth)"),
}


def flag_dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def from_flags(values: dict, tokens: int | None = None) -> Goal | None:
    """The goal the CLI's flags name (`values`: argparse's namespace as a dict), None when none
    is given; two goals at once are refused."""
    given = [(flag, values[flag_dest(flag)]) for flag in FLAGS if values.get(flag_dest(flag)) is not None]
    if len(given) > 1:
        raise LpcompileError(f"one goal at a time: {' and '.join(f for f, _ in given)} were both given")
    if not given:
        if tokens is not None:
            raise LpcompileError("--latency-tokens goes with a goal of --format auto")
        return None
    flag, value = given[0]
    stat = values.get("cosine_stat")
    if stat is not None and FLAGS[flag][0] is not MinCosine:
        raise LpcompileError(f"--cosine-stat goes with --min-cosine, not {flag}")
    if stat is not None:
        return MinCosine(value, tokens=1 if tokens is None else tokens, stat=stat)
    return FLAGS[flag][0](value, tokens=1 if tokens is None else tokens)
