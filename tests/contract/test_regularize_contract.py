"""Contract tests of issue 11's regularizers (hesse.regularize), written from the issue text.

Values against dense ``torch.func`` references, gradients against central finite differences.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian

from hesse import regularize

torch.set_num_threads(1)
DT = torch.float64


def _data(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 2, (n,), generator=g)


# ---------------------------------------------------------------- regularize


def _functional_mlp(theta, x):
    W1, b1, W2 = theta[:12].view(4, 3), theta[12:16], theta[16:24].view(2, 4)
    return torch.tanh(x @ W1.T + b1) @ W2.T


def _split(theta):
    return [theta[:12].view(4, 3), theta[12:16], theta[16:24].view(2, 4)]


def _leaves(theta):
    return [t.detach().clone().requires_grad_() for t in _split(theta)]


def _loss_from(ps, x, y):
    W1, b1, W2 = ps
    return F.cross_entropy(torch.tanh(x @ W1.T + b1) @ W2.T, y)


def _fd_gradient(f, theta, h=1e-5):
    out = torch.empty_like(theta)
    for i in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[i] = h
        out[i] = (f(theta + e) - f(theta - e)) / (2 * h)
    return out


def _theta0(seed=0):
    return torch.randn(24, dtype=DT, generator=torch.Generator().manual_seed(seed))


def _check_penalty_gradient(penalty):
    """Gradient of penalty(params) by autograd equals central finite differences."""
    theta = _theta0()

    def value(t):
        ps = _leaves(t)
        return penalty(ps).item()

    ps = _leaves(theta)
    grads = torch.autograd.grad(penalty(ps), ps)
    auto = torch.cat([g.reshape(-1) for g in grads])
    fd = _fd_gradient(value, theta)
    assert torch.allclose(auto, fd, rtol=1e-6, atol=1e-8), (auto - fd).abs().max()
    assert auto.abs().max() > 1e-3


def test_hessian_trace_gradient_equals_finite_differences():
    x, y = _data(3)
    _check_penalty_gradient(
        lambda ps: regularize.hessian_trace(_loss_from(ps, x, y), ps, probes=2, seed=11)
    )


def test_hessian_trace_is_unbiased_over_seeds():
    x, y = _data(3)
    theta = _theta0()
    H = hessian(lambda t: F.cross_entropy(_functional_mlp(t, x), y))(theta)
    n = 400
    vals = []
    for seed in range(n):
        ps = _leaves(theta)
        vals.append(regularize.hessian_trace(_loss_from(ps, x, y), ps, seed=seed).item())
    v = torch.tensor(vals, dtype=DT)
    # Var[z^T H z] = 2 (||H||_F^2 - sum_i H_ii^2) for Rademacher z.
    se = math.sqrt(2 * ((H**2).sum() - (H.diag() ** 2).sum()).item() / n)
    assert abs(v.mean().item() - H.trace().item()) < 5 * se


def test_gradient_norm_value_and_gradient():
    x, y = _data(3)
    theta = _theta0()
    g = torch.func.grad(lambda t: F.cross_entropy(_functional_mlp(t, x), y))(theta)
    ps = _leaves(theta)
    assert abs(regularize.gradient_norm(_loss_from(ps, x, y), ps).item() - g.norm().item()) < 1e-12
    _check_penalty_gradient(lambda ps: regularize.gradient_norm(_loss_from(ps, x, y), ps))


def test_hessian_alignment_hgp_value_and_gradient():
    envs = [_data(20 + e, 10) for e in range(3)]
    theta = _theta0()
    a, gs = [], []
    for x, y in envs:
        f = lambda t, x=x, y=y: F.cross_entropy(_functional_mlp(t, x), y)  # noqa: E731
        g = torch.func.grad(f)(theta)
        a.append(hessian(f)(theta) @ g)
        gs.append(g)
    A, G = torch.stack(a), torch.stack(gs)
    want = ((A - A.mean(0)) ** 2).sum(1).mean() + 0.5 * ((G - G.mean(0)) ** 2).sum(1).mean()

    def pen(ps, method="hgp"):
        losses = [_loss_from(ps, x, y) for x, y in envs]
        return regularize.hessian_alignment(losses, ps, method, gradient_weight=0.5, seed=2)

    ps = _leaves(theta)
    assert abs(pen(ps).item() - want.item()) < 1e-10 * max(1.0, want.item())
    _check_penalty_gradient(pen)
    _check_penalty_gradient(lambda ps: pen(ps, "hutchinson"))


def test_regularizer_bad_input_is_an_error():
    w = torch.ones(3, dtype=DT, requires_grad=True)
    with pytest.raises(ValueError):
        regularize.hessian_trace((w**3).sum(), [w], probes=0)
    with pytest.raises(ValueError):
        regularize.hessian_trace(w**3, [w])  # not a scalar
    with pytest.raises(ValueError):
        regularize.hessian_alignment([(w**3).sum()], [w])  # one domain
    with pytest.raises(ValueError):
        regularize.hessian_alignment([(w**3).sum(), (w**2).sum()], [w], method="bogus")
