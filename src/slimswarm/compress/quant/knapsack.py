"""Multiple-choice knapsack: one option per item (a tensor's format), least total loss under a byte budget.

Exact dynamic programming over the budget in units of ``unit`` bytes. Each option's extra cost over its item's
cheapest option is rounded *up* to whole units, so a solution that fits in units also fits in bytes: the budget
is never exceeded (the price is at most one unit of slack per item, reported as ``unit``)."""

from __future__ import annotations

import math

import numpy as np

from ...errors import SlimswarmError


def choose(costs: list[list[int]], losses: list[list[float]], budget: int, max_cells: int = 1 << 18) -> dict:
    """``costs[i][c]`` bytes and ``losses[i][c]`` predicted loss of option ``c`` for item ``i``.

    Returns {"choice": [c per item], "bytes": exact total, "loss": total, "unit": bytes per DP cell}.
    Raises when even the cheapest options do not fit."""
    if len(costs) != len(losses) or any(len(a) != len(b) or not a for a, b in zip(costs, losses)):
        raise ValueError("costs and losses must have the same non-empty option lists per item")
    base = [min(c) for c in costs]
    floor = sum(base)
    if floor > budget:
        raise SlimswarmError(f"budget {budget:,} bytes is below the {floor:,} bytes of the cheapest options")
    room = budget - floor
    extra = [[c - b for c in cs] for cs, b in zip(costs, base)]
    unit = max(1, math.ceil(room / max_cells))
    cells = room // unit
    inf = np.inf
    best = np.zeros(cells + 1)  # best[k]: least loss with extra cost <= k units, items so far
    picks = np.zeros((len(costs), cells + 1), dtype=np.int16)
    for i, (ex, ls) in enumerate(zip(extra, losses)):
        new = np.full(cells + 1, inf)
        arg = np.zeros(cells + 1, dtype=np.int16)
        for c, (e, loss) in enumerate(zip(ex, ls)):
            k = math.ceil(e / unit)
            if k > cells:
                continue
            cand = np.full(cells + 1, inf)
            cand[k:] = best[: cells + 1 - k] + loss
            better = cand < new
            new[better] = cand[better]
            arg[better] = c
        best, picks[i] = new, arg
    choice = [0] * len(costs)
    k = cells
    for i in range(len(costs) - 1, -1, -1):
        c = int(picks[i, k])
        choice[i] = c
        k -= math.ceil(extra[i][c] / unit)
    total = sum(costs[i][c] for i, c in enumerate(choice))
    assert total <= budget, (total, budget)
    return {"choice": choice, "bytes": total, "loss": float(sum(losses[i][c] for i, c in enumerate(choice))),
            "unit": unit}
