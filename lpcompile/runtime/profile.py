"""Where a compiled model spends its time: per kernel and per op type (`lpcompile bench DIR --profile`).

TVM 0.27's Relax VM has no `profile=` switch, but it calls an instrument before and after every
call instruction (`VirtualMachine.set_instrument`): each call of a kernel (a PrimFunc, a hand
kernel called by name, a VM builtin) is timed there, wall clock, and summed by symbol over
`repeat` runs. The instrument adds a little to every call (a Python callback twice per call):
`instrumented_ms` against the plain `wall_ms` says how much; shares are of the kernels' sum.

Op types come from the symbols the lowering gives its kernels (`lp_matmul_*`, `lp_quantize_*`,
`lp_hadamard_*`) and from TVM's names for what it legalized and fused (`fused_layer_norm_multiply`
counts as a layer norm: the first op type named in a fused kernel's symbol wins, in the order of
`OP_TYPES`).
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np

# (op type, words of a symbol that mark it), first match wins: the VM's own builtins, then heavier
# ops before the elementwise ones fused into them
OP_TYPES = (
    ("VM builtins (alloc, shapes)", ("vm.builtin",)),
    ("quantized matmul", ("lp_matmul",)),
    ("activation quantize", ("lp_quantize",)),
    ("hadamard", ("lp_hadamard",)),
    ("float matmul (attention)", ("matmul", "dense", "batch_matmul")),
    ("layer norm", ("layer_norm", "rms_norm")),
    ("softmax", ("softmax",)),
    ("gelu / activation", ("gelu", "erf", "tanh", "sigmoid", "silu", "relu")),
    ("gather", ("take", "gather")),
    ("layout (transpose / reshape)", ("transpose", "reshape", "expand_dims", "squeeze", "concat", "split",
                                      "strided_slice", "permute")),
)
OTHER = "elementwise / other"


def op_type(symbol: str) -> str:
    """The op type of a kernel symbol (see the module docstring)."""
    for name, words in OP_TYPES:
        if any(w in symbol for w in words):
            return name
    return OTHER


def profile_calls(call, repeat: int, set_instrument, sync) -> dict:
    """Time `call()` (one model run) `repeat` times without and then with the instrument; returns
    the per-symbol and per-op-type breakdown (the kernels' times summed over runs, per run)."""
    call()  # warm: first-call allocations are not what a steady run costs
    sync()
    plain = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        sync()
        plain.append(time.perf_counter() - t0)

    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    started: list[float] = []

    def instrument(func, symbol, before_run, ret_value, *args):
        if before_run:
            started.append(time.perf_counter())
        else:
            sync()
            name = str(symbol)
            total[name] += time.perf_counter() - started.pop()
            count[name] += 1
        return 0  # VMInstrumentReturnKind.NO_OP: run the call as usual

    set_instrument(instrument)
    try:
        instrumented = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            call()
            sync()
            instrumented.append(time.perf_counter() - t0)
    finally:
        set_instrument(None)

    kernels_ms = sum(total.values()) * 1e3 / repeat
    symbols = sorted(({"symbol": s, "op_type": op_type(s), "calls": count[s] // repeat,
                       "ms": round(t * 1e3 / repeat, 4), "share": round(t * 1e3 / repeat / kernels_ms, 4)}
                      for s, t in total.items()), key=lambda r: -r["ms"])
    by_type: dict[str, dict] = {}
    for r in symbols:
        e = by_type.setdefault(r["op_type"], {"op_type": r["op_type"], "calls": 0, "ms": 0.0})
        e["calls"] += r["calls"]
        e["ms"] += r["ms"]
    types = sorted(by_type.values(), key=lambda e: -e["ms"])
    for e in types:
        e["ms"] = round(e["ms"], 4)
        e["share"] = round(e["ms"] / kernels_ms, 4)
    return {
        "repeat": repeat,
        "wall_ms": round(float(np.median(plain)) * 1e3, 4),
        "instrumented_ms": round(float(np.mean(instrumented)) * 1e3, 4),  # a mean, as kernels_ms is
        "kernels_ms": round(kernels_ms, 4),
        "op_types": types,
        "kernels": symbols,
    }


def render(result: dict, top: int = 25) -> str:
    """The profile as two text tables: op types, then the `top` slowest kernels."""
    lines = [f"wall {result['wall_ms']:.3f} ms per run (median of {result['repeat']}); instrumented "
             f"{result['instrumented_ms']:.3f} ms (mean), of which kernels {result['kernels_ms']:.3f} ms", "",
             f"{'op type':<32} {'calls':>6} {'ms':>10} {'share':>7}"]
    lines += [f"{e['op_type']:<32} {e['calls']:>6} {e['ms']:>10.3f} {e['share']:>6.1%}" for e in result["op_types"]]
    lines += ["", f"{'kernel':<56} {'calls':>6} {'ms':>10} {'share':>7}"]
    lines += [f"{r['symbol'][:56]:<56} {r['calls']:>6} {r['ms']:>10.3f} {r['share']:>6.1%}"
              for r in result["kernels"][:top]]
    if len(result["kernels"]) > top:
        rest = result["kernels"][top:]
        lines.append(f"{f'({len(rest)} more)':<56} {sum(r['calls'] for r in rest):>6} "
                     f"{sum(r['ms'] for r in rest):>10.3f} {sum(r['share'] for r in rest):>6.1%}")
    return "\n".join(lines)
