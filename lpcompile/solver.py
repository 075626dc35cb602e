"""Exact multiple-choice knapsack solvers: one option per group, minimising the summed error under
a summed-cost budget (`solve_budget`) or the summed cost under a summed-error bound
(`solve_error`). Pure numpy; the goals (`lpcompile.goals`) say which to use with what."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lpcompile.errors import LpcompileError


def solve_budget(costs: Sequence[Sequence[float]], errors: Sequence[Sequence[float]], budget: float,
                 resolution: int = 4096) -> list[int]:
    """One option per group minimising Σ error subject to Σ cost <= budget (multiple-choice
    knapsack, exact DP over what each option costs beyond its group's cheapest, rounded up to
    `budget / resolution`; with integer costs and resolution == budget it is exact). The cheapest
    plan is always feasible however the extras round: a budget of exactly the cheapest sum gets
    it. Raises `LpcompileError` when even the cheapest options exceed the budget."""
    cheapest = sum(min(c) for c in costs)
    if cheapest > budget * (1 + 1e-12):
        raise LpcompileError(f"budget {budget:g} is below the smallest achievable {cheapest:g}")
    unit = budget / resolution if budget > 0 else 1.0
    cap = int(math.floor(max(budget - cheapest, 0.0) / unit + 1e-9))  # the slack, in units
    units = [np.ceil((np.asarray(c, np.float64) - min(c)) / unit - 1e-9).astype(np.int64) for c in costs]
    best = np.zeros(cap + 1)  # best[r]: least error of the groups so far with total units <= r
    picks = []
    for u, e in zip(units, errors):
        e = np.asarray(e, np.float64)
        new = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, np.int32)
        for j, (uj, ej) in enumerate(zip(u, e)):
            if uj > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[uj:] = best[: cap + 1 - uj] + ej
            better = cand < new
            new[better], arg[better] = cand[better], j
        best = new
        picks.append(arg)
    choice, r = [], cap
    for u, arg in zip(reversed(units), reversed(picks)):
        j = int(arg[r])
        choice.append(j)
        r -= int(u[j])
    return choice[::-1]


def solve_error(costs: Sequence[Sequence[float]], errors: Sequence[Sequence[float]], max_error: float,
                resolution: int = 4096) -> list[int]:
    """One option per group with the least Σ cost subject to Σ error <= max_error (the same DP
    over costs; the least-cost feasible level is then backtracked). Raises `LpcompileError` when
    even the most accurate options exceed `max_error`."""
    floor = sum(min(e) for e in errors)
    if floor > max_error:
        raise LpcompileError(f"error target {max_error:g} is below the smallest achievable {floor:g}")
    top = sum(max(c) for c in costs)
    lo, hi = sum(min(c) for c in costs), top
    best = solve_budget(costs, errors, hi, resolution)
    # Bisection on the budget: the DP's least error is monotone in the budget.
    for _ in range(40):
        if hi - lo <= max(top, 1.0) * 1e-6:
            break
        mid = 0.5 * (lo + hi)
        choice = solve_budget(costs, errors, mid, resolution)
        if sum(errors[i][j] for i, j in enumerate(choice)) <= max_error:
            hi, best = mid, choice
        else:
            lo = mid
    return best
