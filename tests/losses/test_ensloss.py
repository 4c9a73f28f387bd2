"""EnsLoss: seeded, calibrated (every derivative < 0) and convex (non-decreasing in the margin)."""

import pytest
import torch

from hesse import losses

DT = torch.float64


def _margins(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=DT) * 2


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_derivatives_are_calibrated_and_convex(lam):
    loss = losses.EnsLoss(seed=3, lam=lam)
    for step in range(20):
        z = _margins(64, step)
        g = loss.derivatives(z)
        assert (g < 0).all() and (g >= -1 - 1e-6).all()
        inside = z <= 1  # outside, the tail divides by z
        order = z[inside].argsort()
        assert (g[inside][order].diff() >= 0).all()  # phi' non-decreasing: phi convex


def test_same_seed_same_sequence_of_losses():
    z, y = _margins(16, 0), (torch.arange(16) % 2)
    a, b = losses.EnsLoss(seed=5), losses.EnsLoss(seed=5)
    first = [a(z, y) for _ in range(3)]
    assert all(torch.equal(u, b(z, y)) for u in first)
    assert not torch.equal(first[0], first[1])  # a new loss at every call


def test_gradient_is_the_drawn_derivative_times_the_label():
    f = _margins(8, 1).requires_grad_(True)
    y = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0])
    loss = losses.EnsLoss(seed=2)
    loss(f, y).backward()
    g = losses.EnsLoss(seed=2).derivatives((2 * y - 1) * f.detach())
    assert torch.allclose(f.grad, g * (2 * y - 1) / 8, atol=1e-15)
    assert loss.linear and loss.stochastic


def test_names_round_trip():
    for text in ["gce:q=0.7", "mae", "sum_exp", "comp_sum:tau=0.5", "zloss:a=2,b=-1",
                 "anyloss:metric=f_beta,beta=2,L=73", "adv_comp_sum:tau=1,nu=0.5",
                 "ensloss:seed=4"]:  # fmt: skip
        assert losses.parse(text).spec == text
    with pytest.raises(ValueError, match="unknown name 'focal'"):
        losses.parse("focal")
