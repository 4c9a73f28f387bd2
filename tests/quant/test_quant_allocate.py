import itertools
import math

import numpy as np
import pytest

from hesse import quant
from hesse.quant import Quantizer
from hesse.quant.sensitivity import LayerSensitivity, Sensitivity

BITS = (2, 4, 8)


def random_sens(n_layers, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_layers):
        n = int(rng.integers(4, 200))
        s = float(rng.lognormal())
        delta = {b: float(n * rng.uniform(0.5, 2) * 4.0 ** (-b)) for b in BITS}
        omega = {b: s * d for b, d in delta.items()}
        rows.append(LayerSensitivity(f"l{i}", f"l{i}.weight", n, n * int(rng.integers(1, 9)),
                                     s, False, delta, omega))  # fmt: skip
    return Sensitivity("trace", BITS, tuple(rows), Quantizer(), "hessian", 0)


def brute(sens, budget, cost="size", fixed=None, tie=()):
    """Min Σ omega over every configuration that fits, by enumeration."""
    best = (math.inf, None)
    for config in itertools.product(BITS, repeat=len(sens.layers)):
        bits = dict(zip(sens.names, config, strict=True))
        if any(bits[n] != b for n, b in (fixed or {}).items()):
            continue
        if any(len({bits[n] for n in group}) > 1 for group in tie):
            continue
        c = sum(_cost(r, bits[r.name], cost) for r in sens.layers)
        w = sum(r.omega[bits[r.name]] for r in sens.layers)
        if c <= budget and w < best[0]:
            best = (w, bits)
    return best


def _cost(row, b, cost):
    return row.n_params * b / 8 if cost == "size" else row.macs * b * 8


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("cost", ["size", "bops"])
def test_milp_equals_brute_force_on_8_layers_by_3_widths(seed, cost):
    sens = random_sens(8, seed)
    full = sum(_cost(r, 8, cost) for r in sens.layers)
    for share in (0.3, 0.45, 0.7):
        budget = share * full
        alloc = quant.allocate(sens, budget, cost=cost, frontier=0)
        best, _ = brute(sens, budget, cost)
        assert alloc.predicted == pytest.approx(best, rel=1e-9)
        spent = alloc.size_bytes if cost == "size" else alloc.bops
        assert spent <= budget
        assert alloc.predicted == pytest.approx(
            sum(r.omega[alloc.bits[r.name]] for r in sens.layers)
        )


def test_fixed_and_tied_layers_are_honoured_exactly():
    sens = random_sens(7, 11)
    budget = 0.4 * sum(r.n_params for r in sens.layers)
    fixed, tie = {"l0": 8, "l3": 2}, [["l1", "l2", "l5"]]
    alloc = quant.allocate(sens, budget, fixed=fixed, tie=tie, frontier=0)
    best, _ = brute(sens, budget, fixed=fixed, tie=tie)
    assert alloc.predicted == pytest.approx(best, rel=1e-9)
    assert alloc.bits["l0"] == 8 and alloc.bits["l3"] == 2
    assert alloc.bits["l1"] == alloc.bits["l2"] == alloc.bits["l5"]


def test_a_tie_with_one_fixed_member_fixes_the_others():
    sens = random_sens(5, 4)
    budget = 0.6 * sum(r.n_params for r in sens.layers)
    fixed, tie = {"l0": 8}, [["l0", "l1"]]
    alloc = quant.allocate(sens, budget, fixed=fixed, tie=tie, frontier=0)
    assert alloc.bits["l0"] == alloc.bits["l1"] == 8
    assert alloc.predicted == pytest.approx(brute(sens, budget, fixed=fixed, tie=tie)[0], rel=1e-9)


def test_infeasible_budget_names_the_smallest_feasible_one():
    sens = random_sens(5, 2)
    least = sum(r.n_params * 2 / 8 for r in sens.layers if r.name != "l4") + sens["l4"].n_params
    with pytest.raises(ValueError, match=f"smallest feasible budget is {least:g}"):
        quant.allocate(sens, least - 0.5, fixed={"l4": 8})
    assert quant.allocate(sens, least, fixed={"l4": 8}, frontier=0).bits["l4"] == 8


def test_frontier_is_the_pareto_set_of_optimal_configurations():
    sens = random_sens(6, 5)
    alloc = quant.allocate(sens, 0.5 * sum(r.n_params for r in sens.layers), frontier=12)
    costs = [p.cost for p in alloc.frontier]
    omegas = [p.predicted for p in alloc.frontier]
    assert costs == sorted(costs) and omegas == sorted(omegas, reverse=True)
    assert costs[0] == pytest.approx(sum(r.n_params * 2 / 8 for r in sens.layers))
    assert costs[-1] == pytest.approx(sum(r.n_params * 8 / 8 for r in sens.layers))
    for p in alloc.frontier:  # each point is optimal at its own cost
        assert p.predicted == pytest.approx(brute(sens, p.cost)[0], rel=1e-9)


def test_bad_arguments_are_refused():
    sens = random_sens(3, 0)
    with pytest.raises(ValueError, match="cost must be"):
        quant.allocate(sens, 100, cost="latency")
    with pytest.raises(ValueError, match=r"widths \[3\] that the sensitivity was not measured"):
        quant.allocate(sens, 100, bits=(2, 3))
    with pytest.raises(ValueError, match="unknown layer 'head'"):
        quant.allocate(sens, 100, fixed={"head": 8})
    with pytest.raises(ValueError, match="unknown layer 'x'"):
        quant.allocate(sens, 100, tie=[["l0", "x"]])
    with pytest.raises(ValueError, match="fixed to different widths"):
        quant.allocate(sens, 1e6, fixed={"l0": 2, "l1": 4}, tie=[["l0", "l1"]])
    with pytest.raises(ValueError, match="1 to 16"):
        quant.allocate(sens, 100, bits=(0, 2))
