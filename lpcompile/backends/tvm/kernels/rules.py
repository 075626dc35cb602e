"""Which kernel a quantized matmul gets: one ordered rule list per target kind, first that applies wins.

    choice = choose(describe(target), MatmulSpec("uint8", "int8", k=384, n=1536, block=384))
    choice.rule.name      # "vnni-u8s8-gemm"
    choice.dot4           # the weights go in the dot-product layout
    choice.refused        # {"avx512-int4-gemv": "float x int4 only"}: why the rules before it did not apply

A rule is a name, the weight layout its kernel reads (`dot4`: True, False, or None for either),
`check(target, spec)` (None: it applies; else why not, in a few words) and `build(func)` (the
scheduled PrimFunc). The order of a list is the policy: hand-written kernels first, each only
where it is known to be right (a test shows it equal to the shared compute), the generic schedule
of the compute definition last (it applies to everything).

The same list answers three questions, so they cannot disagree:
- lowering (`lower.kernel_choice`): which layout a layer's weights are packed in, before the
  kernel exists (`MatmulSpec.dot4` None: the layout is the chosen rule's);
- scheduling (`schedule_matmul`, from `kernels.schedule`): which kernel a definition gets
  (`MatmulSpec.of(func)`: its layout fixed);
- latency (`latency.kernels_for`, through `lower.kernel_choice`): what is timed is what is emitted.
The lowering report names each layer's rule and the reasons the rules before it were refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import tvm
from tvm import tirx

from lpcompile.backends.tvm.kernels import avx2, cpu, cuda, cuda_int4, mma, x86
from lpcompile.backends.tvm.kernels.compute import FLOAT8, INT_RANGE, KERNEL_ATTR, PAIRS
from lpcompile.backends.tvm.kernels.packing import DOT4, NIB8, NIBBLE, ceil_div
from lpcompile.backends.tvm.target import describe
from lpcompile.errors import TargetError
from lpcompile.targets import FP8_MIN_SM, INT8_MMA_MIN_SM, Target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MatmulSpec:
    """One `compute.quantized_matmul` as the rules see it: operand dtypes, K x N, the K block of
    the weight scales (k: one block), `rows` (the static row count, None when symbolic; the
    lowering says 1 or None), the weight layout (`dot4`; None while lowering has not chosen it),
    whether it is an accumulator-only test variant, and the int4 tile (`tile_n`, `lanes`)."""

    activation: str
    weight: str
    k: int
    n: int
    block: int
    rows: int | None = None
    dot4: bool | None = None
    accumulator_only: bool = False
    tile_n: int | None = None  # None: the default NIBBLE layout's for int4 weights
    lanes: int | None = None

    @property
    def k_pad(self) -> int:
        return ceil_div(self.k, self.block) * self.block

    @property
    def int4_tile(self) -> tuple[int, int]:
        """(tile_n, lanes) of the int4 weight layout."""
        return (self.tile_n or NIBBLE.tile, self.lanes or NIBBLE.lanes)

    @property
    def zero_point(self) -> bool:
        """Whether the activation has a zero point (int8 / uint8 with a tensor scale)."""
        pair = PAIRS.get((self.activation, self.weight))
        return pair is not None and pair.act_scale == "tensor" and self.activation in INT_RANGE

    @classmethod
    def of(cls, func: tirx.PrimFunc) -> MatmulSpec:
        """The spec of a `quantized_matmul` definition (its attributes and parameters)."""
        attrs = func.attrs
        m = func.params[0].shape[0]
        return cls(str(attrs["lpcompile.activation"]), str(attrs["lpcompile.weight"]), int(attrs["lpcompile.k"]),
                   int(attrs["lpcompile.n"]), int(attrs["lpcompile.block"]),
                   rows=int(m) if isinstance(m, tirx.IntImm) else None, dot4=bool(attrs["lpcompile.dot4"]),
                   accumulator_only="y" not in [p.name for p in func.params],
                   tile_n=int(attrs["lpcompile.tile_n"]), lanes=int(attrs["lpcompile.lanes"]))


Check = Callable[[Target, MatmulSpec], "str | None"]


@dataclass(frozen=True)
class Rule:
    """One kernel: applies where `check` finds nothing against it (see the module docstring)."""

    name: str
    dot4: bool | None  # the weight layout it reads: dot4 (True), plain / int4 tiles (False), either (None)
    check: Check
    build: Callable[[tirx.PrimFunc], tirx.PrimFunc]

    def applies(self, target: Target, spec: MatmulSpec) -> str | None:
        """None when this rule's kernel takes `spec` on `target`, else why not."""
        if self.dot4 is not None and spec.dot4 is not None and spec.dot4 != self.dot4:
            return "weights in the dot4 layout" if spec.dot4 else "weights not in the dot4 layout"
        return self.check(target, spec)


@dataclass(frozen=True)
class Choice:
    rule: Rule
    refused: dict[str, str]  # the rules before it: name -> why it did not apply

    @property
    def dot4(self) -> bool:
        """Whether the weights go in the dot-product layout (the chosen kernel reads it)."""
        return self.rule.dot4 is True


# --- CPU (LLVM: x86 and aarch64) -------------------------------------------------------------------


def _int4_gemv(t: Target, s: MatmulSpec) -> str | None:
    if s.weight != "int4" or s.activation != "float32":
        return "float x int4 only"
    if s.accumulator_only:
        return "accumulator-only variant"
    if s.rows != 1:
        return "one row (GEMV) only"
    tile, _ = s.int4_tile
    if tile != NIBBLE.tile or s.n % NIBBLE.tile:
        return f"N {s.n} not a whole number of {NIBBLE.tile}-wide int4 tiles"
    if s.k % s.block or s.block % x86.K_UNROLL:
        return f"K {s.k} not whole blocks of a multiple of {x86.K_UNROLL} ({s.block})"
    return None if t.has("avx512f") else "needs AVX-512"


def _vnni_u8s8(t: Target, s: MatmulSpec) -> str | None:
    if (s.activation, s.weight) != ("uint8", "int8"):
        return "uint8 x int8 only"
    if s.accumulator_only or not s.zero_point:
        return "accumulator-only variant"
    if s.block != s.k or s.k % 4:
        return "per-channel scales (one K block) and K a multiple of 4 only"
    if s.n % (x86.LANES * x86.VECS):
        return f"N {s.n} not a multiple of {x86.LANES * x86.VECS}"
    return None if t.has("avx512_vnni") else "needs AVX-512 VNNI"


def _avx2_u8s8(t: Target, s: MatmulSpec) -> str | None:
    if (s.activation, s.weight) != ("uint8", "int8"):
        return "uint8 x int8 only"
    if s.accumulator_only or not s.zero_point:
        return "accumulator-only variant"
    if s.block != s.k or s.k % avx2.K_STEP:
        return f"per-channel scales (one K block) and K a multiple of {avx2.K_STEP} only"
    if s.n % DOT4.lanes:
        return f"N {s.n} not a multiple of {DOT4.lanes}"
    return None if t.has("avx2") else "needs AVX2"


def _vnni_w4a8(t: Target, s: MatmulSpec) -> str | None:
    if (s.activation, s.weight) != ("int8", "int4"):
        return "int8 x int4 only"
    if s.accumulator_only:
        return "accumulator-only variant"
    if s.k % s.block or s.block % NIB8.group:
        return f"K {s.k} not whole blocks of a multiple of {NIB8.group} ({s.block})"
    if s.n % (x86.LANES * x86.VECS):
        return f"N {s.n} not a multiple of {x86.LANES * x86.VECS}"
    return None if t.has("avx512_vnni") else "needs AVX-512 VNNI"


def _avx2_w4a8(t: Target, s: MatmulSpec) -> str | None:
    if (s.activation, s.weight) != ("int8", "int4"):
        return "int8 x int4 only"
    if s.accumulator_only:
        return "accumulator-only variant"
    if s.k % s.block or s.block % NIB8.group:
        return f"K {s.k} not whole blocks of a multiple of {NIB8.group} ({s.block})"
    if s.n % NIB8.lanes:
        return f"N {s.n} not a multiple of {NIB8.lanes}"
    return None if t.has("avx2") else "needs AVX2"


_DOT4_GROUP = {("uint8", "int8"): DOT4.group, ("int8", "int4"): NIB8.group}
# Which CPUs get the dot4 layout for a pair: those with a hand kernel that reads it (VNNI's
# vpdpbusd; AVX2's vpmaddwd / vpmaddubsw), so a layer the kernel refuses keeps the layout
# its neighbours were packed in (generic schedule).
_DOT4_FEATURES = {("uint8", "int8"): ("avx512_vnni", "avx2"), ("int8", "int4"): ("avx512_vnni", "avx2")}


def _dot4_layout(t: Target, s: MatmulSpec) -> str | None:
    group = _DOT4_GROUP.get((s.activation, s.weight))
    if group is None:
        return "the dot4 layout serves uint8 x int8 and int8 x int4"
    if s.k_pad % group:
        return f"K padded to {s.k_pad}, not a multiple of {group}"
    features = _DOT4_FEATURES[(s.activation, s.weight)]
    return None if any(t.has(f) for f in features) else "needs " + " or ".join(_FEATURE_NAMES[f] for f in features)


_FEATURE_NAMES = {"avx512_vnni": "AVX-512 VNNI", "avx2": "AVX2"}


def _always(t: Target, s: MatmulSpec) -> str | None:
    return None


def _cpu_generic(func: tirx.PrimFunc) -> tirx.PrimFunc:
    return cpu.SCHEDULES["quantized_matmul"](func)


CPU_RULES = (
    Rule("avx512-int4-gemv", False, _int4_gemv, x86.int4_gemv),  # table-lookup nibble decode
    Rule("vnni-u8s8-gemm", True, _vnni_u8s8, x86.u8s8_dot4_gemm),  # vpdpbusd, W8A8
    Rule("avx2-u8s8-gemm", True, _avx2_u8s8, avx2.u8s8_dot4_gemm),  # exact vpmaddwd on int16, W8A8
    Rule("vnni-w4a8-gemm", True, _vnni_w4a8, x86.w4a8_dot4_gemm),  # vpdpbusd on biased nibbles
    Rule("avx2-w4a8-gemm", True, _avx2_w4a8, avx2.w4a8_dot4_gemm),  # vpmaddubsw on biased nibbles (exact)
    Rule("dot4-generic", True, _dot4_layout, _cpu_generic),  # the VNNI layout, the generic schedule
    Rule("generic", None, _always, _cpu_generic),
)


# --- CUDA ------------------------------------------------------------------------------------------


def _mma(t: Target, s: MatmulSpec) -> str | None:
    if t.kind != "cuda":
        return "not a CUDA target"
    if s.accumulator_only:
        return "accumulator-only variant"
    a, w = s.activation, s.weight
    if a not in mma.PTX_TYPE or w not in mma.PTX_TYPE or (a in FLOAT8) != (w in FLOAT8) or w == "uint8":
        return "8-bit pairs only (u8/s8 x s8, fp8 x fp8)"
    if w in FLOAT8 and not t.has("mma_fp8"):
        return f"FP8 mma needs sm_{FP8_MIN_SM}+"
    if not t.has("mma_int8"):
        return f"int8 mma needs sm_{INT8_MMA_MIN_SM}+"
    if s.k != s.k_pad or s.block % mma.MMA_K or s.k % s.block:
        return f"K {s.k} not whole blocks of a multiple of {mma.MMA_K} ({s.block})"
    if s.n % (mma.MMA_N * 4):
        return f"N {s.n} not a multiple of {mma.MMA_N * 4}"
    return None


def _int4_split_k(t: Target, s: MatmulSpec) -> str | None:
    if t.kind != "cuda":
        return "not a CUDA target"
    if s.weight != "int4" or s.activation != "float32":
        return "float x int4 only"
    if s.accumulator_only:
        return "accumulator-only variant"
    if s.int4_tile[1] != NIBBLE.lanes:
        return "weights not in the default int4 tiles"
    step = cuda_int4.PHASES * cuda_int4.UNROLL
    if s.k % s.block or s.block % step:
        return f"K {s.k} not whole blocks of a multiple of {step} ({s.block})"
    return None


def _cuda_generic(func: tirx.PrimFunc) -> tirx.PrimFunc:
    return cuda.SCHEDULES["quantized_matmul"](func)


CUDA_RULES = (
    Rule("mma-tensor-core", True, _mma, mma.mma_gemm),  # inline-PTX mma.sync m16n8k32
    Rule("cuda-int4-split-k", False, _int4_split_k, cuda_int4.int4_gemm),
    Rule("generic", None, _always, _cuda_generic),
)

RULES: dict[str, tuple[Rule, ...]] = {"llvm": CPU_RULES, "aarch64": CPU_RULES, "cuda": CUDA_RULES}


def choose(target: Target, spec: MatmulSpec) -> Choice:
    """The first rule of `target`'s list that applies to `spec`, with why the ones before it did not."""
    rules = RULES.get(target.kind)
    if rules is None:
        raise TargetError(f"no kernel rules for target kind {target.kind!r}")
    refused = {}
    for rule in rules:
        reason = rule.applies(target, spec)
        if reason is None:
            return Choice(rule, refused)
        refused[rule.name] = reason
    raise TargetError(f"no kernel rule applies to {spec} on {target.spec}")  # (each list ends with "generic")


def rule(kind: str, name: str) -> Rule:
    """The rule called `name` in the list of target kind `kind`."""
    return next(r for r in RULES[kind] if r.name == name)


def applies(name: str, func: tirx.PrimFunc, target: tvm.target.Target) -> bool:
    """Whether the rule `name` takes the definition `func` on `target` (for tests and benchmarks)."""
    t = describe(target)
    found = [r for r in RULES.get(t.kind, ()) if r.name == name]
    return bool(found) and found[0].applies(t, MatmulSpec.of(func)) is None


def schedule_matmul(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    """A `quantized_matmul` definition scheduled by the first rule of the target's list that applies."""
    if str(func.attrs[KERNEL_ATTR]) != "quantized_matmul":
        raise TargetError(f"the kernel rules schedule quantized_matmul definitions, not {func.attrs[KERNEL_ATTR]}")
    choice = choose(describe(target), MatmulSpec.of(func))
    log.debug("kernel rule %s (refused: %s)", choice.rule.name, choice.refused)
    return choice.rule.build(func)
