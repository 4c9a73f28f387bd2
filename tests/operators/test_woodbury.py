"""WoodburyFisher against the dense damped empirical Fisher (float64)."""

import pytest
import torch

import hesse
from hesse import WoodburyFisher


def _grads(m, d, seed=0):
    return torch.randn(m, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _dense(G, lam):
    return lam * torch.eye(G.shape[1], dtype=G.dtype) + G.T @ G / G.shape[0]


def test_products_and_inverse_match_dense_at_d1000_m32(assert_operator_matches):
    G = _grads(32, 1000)
    F = WoodburyFisher(G, damping=1e-3)
    dense = _dense(G, 1e-3)
    assert_operator_matches(F, dense, rtol=1e-12)
    V = _grads(3, 1000, seed=1).T
    want = torch.linalg.solve(dense, V)
    got = F.inverse() @ V
    assert (got - want).norm() / want.norm() < 1e-8
    assert torch.allclose(F.diag(), torch.diagonal(dense), rtol=1e-12)
    assert torch.allclose(F.inverse_diag(), torch.diagonal(torch.linalg.inv(dense)), rtol=1e-8)
    assert {"symmetric", "psd"} <= F.inverse().tags


def test_sliding_window_drops_the_oldest_gradient():
    G = _grads(10, 50)
    F = WoodburyFisher(G[:4], damping=0.5, window=6)
    for g in G[4:]:
        F.update(g)
    assert F.m == 6 and torch.equal(F.grads, G[4:])
    fresh = WoodburyFisher(G[4:], damping=0.5)
    v = _grads(1, 50, seed=3)[0]
    assert torch.allclose(F @ v, _dense(G[4:], 0.5) @ v, rtol=1e-12)
    assert torch.allclose(F.inverse() @ v, fresh.inverse() @ v, rtol=1e-10)
    assert torch.allclose(F.inverse() @ v, torch.linalg.solve(_dense(G[4:], 0.5), v), rtol=1e-10)


def test_empty_window_is_damping_times_identity():
    F = WoodburyFisher(torch.zeros(0, 5, dtype=torch.float64), damping=2.0, window=3)
    v = torch.arange(5.0, dtype=torch.float64)
    assert torch.equal(F @ v, 2 * v) and torch.equal(F.inverse() @ v, v / 2)
    F.update(torch.ones(5, dtype=torch.float64))
    assert torch.allclose(F @ v, 2 * v + torch.full((5,), v.sum().item(), dtype=torch.float64))


def test_extra_damping_in_inverse():
    G = _grads(5, 20)
    F = WoodburyFisher(G, damping=0.1)
    v = _grads(1, 20, seed=2)[0]
    want = torch.linalg.solve(_dense(G, 0.35), v)
    assert torch.allclose(F.inverse(0.25) @ v, want, rtol=1e-10)


def test_eigs_and_solve_accept_it():
    G = _grads(8, 40)
    F = WoodburyFisher(G, damping=1e-2)
    top = hesse.eigs(F, k=1, seed=0).values[0].item()
    assert top == pytest.approx(torch.linalg.eigvalsh(_dense(G, 1e-2))[-1].item(), rel=1e-8)


def test_float32_gradients_give_float32_products_with_float64_inner_solve():
    G = _grads(16, 200).float()
    F = WoodburyFisher(G, damping=1e-4)
    v = torch.ones(200)
    x = F.inverse() @ v
    assert x.dtype == torch.float32
    # The inner solve runs in float64: only the rounding of G, v and x is float32's.
    want = torch.linalg.solve(_dense(G.double(), 1e-4), v.double())
    assert (x.double() - want).norm() / want.norm() < 1e-6


@pytest.mark.parametrize(
    ("grads", "damping", "kw", "match"),
    [
        (torch.zeros(3), 1.0, {}, "must be \\(m, d\\)"),
        (torch.zeros(2, 3), 0.0, {}, "damping must be positive"),
        (torch.zeros(2, 3), -1.0, {}, "damping must be positive"),
        (torch.zeros(4, 3), 1.0, {"window": 2}, "window=2 is smaller"),
        (torch.tensor([[1.0, float("nan")]]), 1.0, {}, "non-finite"),
    ],
)
def test_bad_input_is_refused(grads, damping, kw, match):
    with pytest.raises(ValueError, match=match):
        WoodburyFisher(grads, damping, **kw)


def test_update_refuses_wrong_shape_and_solver_options():
    F = WoodburyFisher(torch.ones(2, 3), 1.0)
    with pytest.raises(ValueError, match="shape \\(3,\\)"):
        F.update(torch.ones(4))
    with pytest.raises(ValueError, match="exact"):
        F.inverse(method="cg")


def test_state_dict_restores_products_to_the_bit():
    G = _grads(9, 30)
    F = WoodburyFisher(G[:2], damping=0.3, window=4)
    for g in G[2:]:
        F.update(g)
    again = WoodburyFisher.from_state_dict(F.state_dict())
    v = _grads(1, 30, seed=5)[0]
    for g in _grads(3, 30, seed=6):
        F.update(g), again.update(g)
        assert torch.equal(F @ v, again @ v) and torch.equal(F.inverse() @ v, again.inverse() @ v)


def test_an_inverse_follows_updates_with_or_without_extra_damping():
    G = _grads(6, 25)
    F = WoodburyFisher(G[:3], damping=0.2, window=4)
    plain, damped = F.inverse(), F.inverse(0.3)
    v = _grads(1, 25, seed=8)[0]
    plain @ v, damped @ v  # factor cached before the updates
    for g in G[3:]:
        F.update(g)
    held = F.grads
    assert torch.allclose(plain @ v, torch.linalg.solve(_dense(held, 0.2), v), rtol=1e-10)
    assert torch.allclose(damped @ v, torch.linalg.solve(_dense(held, 0.5), v), rtol=1e-10)
    inv = torch.linalg.inv(_dense(held, 0.5))
    assert torch.allclose(damped.diag(), torch.diagonal(inv), rtol=1e-10)
