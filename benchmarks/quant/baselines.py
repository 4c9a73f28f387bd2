"""The allocations hesse.quant is measured against: uniform, random, HAWQ-V1's order."""

from __future__ import annotations

import random

from hesse.quant import Sensitivity


def size(sens: Sensitivity, bits: dict[str, int]) -> float:
    return sum(r.n_params * bits[r.name] / 8 for r in sens.layers)


def uniform(sens: Sensitivity, b: int) -> dict[str, int]:
    return {n: b for n in sens.names}


def _fill(sens: Sensitivity, widths, bits: dict, budget: float, order) -> dict[str, int]:
    """Raise layers one width at a time, in ``order()`` each round, while they fit the budget."""
    changed = True
    while changed:
        changed = False
        for name in order():
            i = widths.index(bits[name])
            if i + 1 < len(widths):
                trial = bits | {name: widths[i + 1]}
                if size(sens, trial) <= budget:
                    bits, changed = trial, True
    return bits


def random_allocation(sens: Sensitivity, widths, budget: float, seed: int) -> dict[str, int]:
    """Each layer's width drawn at random until the draw fits, then filled up in random order."""
    rng = random.Random(seed)
    widths = list(widths)
    while True:
        bits = {n: rng.choice(widths) for n in sens.names}
        if size(sens, bits) <= budget:
            break

    def order():
        names = list(sens.names)
        rng.shuffle(names)
        return names

    return _fill(sens, widths, bits, budget, order)


def hawq_v1(eig: Sensitivity, widths, budget: float) -> dict[str, int]:
    """HAWQ's order: the most sensitive layers (lambda_max / n_i) get the most bits.

    In descending order each layer gets the highest width that leaves every later layer its
    lowest width; what is left is filled in the same order.
    """
    widths = list(widths)
    ranked = [
        r.name for r in sorted(eig.layers, key=lambda r: r.top_eig / r.n_params, reverse=True)
    ]
    bits = uniform(eig, widths[0])
    for name in ranked:
        fits = [b for b in widths if size(eig, bits | {name: b}) <= budget]
        bits[name] = max(fits)
    return _fill(eig, widths, bits, budget, lambda: ranked)
