"""Same seed, same numbers: eigs, trace, density, diagonal, on dense and model operators."""

import pytest
import torch

import hesse
from cases import DT, objective, sym_matrix


def inputs():
    A = sym_matrix(torch.randn(80, generator=torch.Generator().manual_seed(30), dtype=DT), seed=30)
    return {"dense": lambda: A, "hessian": lambda: hesse.HessianOperator(objective("mlp_ce"))}


@pytest.mark.parametrize("kind", ["dense", "hessian"])
def test_same_seed_same_numbers(kind):
    make = inputs()[kind]
    runs = [
        (
            hesse.eigs(make(), k=3, seed=5),
            hesse.trace(make(), budget=30, method="hutch++", seed=5),
            hesse.trace(make(), budget=30, method="hutchinson", seed=5),
            hesse.density(make(), steps=10, probes=3, seed=5),
            hesse.diagonal(make(), budget=6, seed=5),
        )
        for _ in range(2)
    ]
    (e1, t1, h1, s1, g1), (e2, t2, h2, s2, g2) = runs
    assert torch.equal(e1.values, e2.values) and torch.equal(e1.vectors, e2.vectors)
    assert (t1.value, t1.stderr) == (t2.value, t2.stderr)
    assert (h1.value, h1.stderr) == (h2.value, h2.stderr)
    assert torch.equal(torch.as_tensor(s1.nodes), torch.as_tensor(s2.nodes))
    assert torch.equal(torch.as_tensor(s1.weights), torch.as_tensor(s2.weights))
    assert torch.equal(g1.value, g2.value)


def test_different_seeds_differ():
    A = inputs()["dense"]()
    a = hesse.trace(A, budget=30, method="hutchinson", seed=1).value
    b = hesse.trace(A, budget=30, method="hutchinson", seed=2).value
    assert a != b


def test_seed_does_not_touch_global_rng():
    A = inputs()["dense"]()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    hesse.trace(A, budget=20, method="hutchinson", seed=7)
    hesse.eigs(A, k=2, seed=7)
    assert torch.equal(torch.rand(3), expected)
