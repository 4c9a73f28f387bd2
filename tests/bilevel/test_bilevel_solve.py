"""hesse.bilevel.solve on quadratic bilevel problems with closed-form solutions (float64)."""

import pytest
import torch
import torch.nn.functional as F
from bilevel_problems import D, quadratic
from torch import nn

from hesse import Objective
from hesse.bilevel import BSVROptions, ImplicitOptions, LVHBAOptions, solve
from hesse.influence import hypergradient


@pytest.fixture(scope="module")
def problem():
    return quadratic(m=2, rho=0.5)


def _start(P):
    return torch.zeros(P.B.shape[2], dtype=D), torch.zeros(P.B.shape[0], P.B.shape[1], dtype=D)


def test_bsvr_full_batch_reaches_closed_form(problem):
    P = problem
    x0, Y0 = _start(P)
    opts = BSVROptions(lr=0.2, inner_lr=0.5)
    r = solve(P.upper, P.lower, x0, Y0, data=P.data(None), blocks=2, options=opts, steps=300)
    assert (r.hparams - P.x_star()).norm() < 1e-8
    assert (r.params - P.y_star(r.hparams)).norm() < 1e-8
    # one double backward per block and step (and at the start): beta < 1 evaluates both points
    assert r.n_hvps == 2 * (2 * 300 - 1) + 2


def test_tracked_ihvp_matches_dense_solve(problem):
    P = problem
    x0, Y0 = _start(P)
    x_fixed = torch.linspace(-1, 1, x0.numel(), dtype=D)
    opts = BSVROptions(lr=0.1, inner_lr=0.5, beta=1.0, beta_x=1.0)
    r = solve(
        P.upper,
        P.lower,
        x_fixed,
        Y0,
        data=P.data(None),
        blocks=2,
        options=opts,
        steps=150,
        project=lambda x: x_fixed,
    )
    y = P.y_star(x_fixed)
    want = torch.linalg.solve(P.A, (y - P.t)[..., None])[..., 0]
    assert torch.allclose(r.ihvp, want, rtol=0, atol=1e-9)
    assert r.n_hvps == 2 * 151  # beta = 1: no previous-point products


def test_bsvr_minibatches_get_close(problem):
    P = problem
    x0, Y0 = _start(P)
    opts = BSVROptions(lr=0.1, inner_lr=0.3, beta=0.2, beta_x=0.2)
    run = lambda steps, seed: solve(  # noqa: E731
        P.upper, P.lower, x0, Y0, data=P.data(20), blocks=2, options=opts, steps=steps, seed=seed
    )
    r = run(300, 1)
    assert (r.hparams - P.x_star()).norm() < 0.15 * P.x_star().norm()
    assert torch.equal(run(3, 1).hparams, run(3, 1).hparams)
    assert not torch.equal(run(3, 1).hparams, run(3, 2).hparams)


def test_bsvr_block_sampling_descends():
    P = quadratic(m=3)
    x0, Y0 = _start(P)
    opts = BSVROptions(lr=0.05, inner_lr=0.1, beta=0.8, beta_x=0.8, blocks_per_step=2)
    r = solve(P.upper, P.lower, x0, Y0, data=P.data(None), blocks=3, options=opts, steps=300)
    assert (r.hparams - P.x_star()).norm() < 0.2 * P.x_star().norm()
    assert r.n_hvps == 3 + 2 * (2 * 300 - 1)


def test_implicit_reaches_closed_form(problem):
    P = problem
    x0, Y0 = _start(P)
    opts = ImplicitOptions(lr=0.7, inner_lr=0.5, inner_steps=5, max_matvecs=10, tol=1e-10)
    r = solve(
        P.upper,
        P.lower,
        x0,
        Y0,
        method="implicit",
        data=P.data(None),
        blocks=2,
        options=opts,
        steps=40,
    )
    assert (r.hparams - P.x_star()).norm() < 1e-7
    assert r.solves_converged and r.max_residual <= 1e-10
    want = torch.linalg.solve(P.A, (r.params - P.t)[..., None])[..., 0]
    assert torch.allclose(r.ihvp, want, atol=1e-9)


def _constrained():
    """Minimize ||y - 2||²/2 + ||x||²/2, y = argmin{||θ - 2||²/2 : θ <= x}: x* = y* = 1."""
    upper = lambda x, y, b: 0.5 * ((y - 2) ** 2).sum() + 0.5 * (x**2).sum()  # noqa: E731
    lower = lambda x, y, b: 0.5 * ((y - 2) ** 2).sum()  # noqa: E731
    return upper, lower, (lambda x, y: y - x)


def test_lvhba_constrained_reaches_closed_form_and_is_feasible():
    upper, lower, con = _constrained()
    z = torch.zeros(3, dtype=D)
    opts = LVHBAOptions(lr=0.2)
    r = solve(upper, lower, z, z, method="lvhba", constraint=con, options=opts, steps=400)
    assert torch.allclose(r.hparams, torch.ones(3, dtype=D), atol=1e-6)
    assert torch.allclose(r.params, torch.ones(3, dtype=D), atol=1e-6)
    assert r.violation <= 1e-12 and r.n_hvps == 0
    assert max(r.trajectory.violation[1:]) <= 1e-12


def test_lvhba_unconstrained_approaches_solution():
    # F = ||y - 1||²/2 + ||x||²/2, y*(x) = x: x* = 1/2; the penalty's bias shrinks like 1/c_k
    upper = lambda x, y, b: 0.5 * ((y - 1) ** 2).sum() + 0.5 * (x**2).sum()  # noqa: E731
    lower = lambda x, y, b: 0.5 * ((y - x) ** 2).sum()  # noqa: E731
    z = torch.zeros(2, dtype=D)
    opts = LVHBAOptions(gamma1=10, lr=0.1, c=1, p=0.45, theta_lr=0.5)
    runs = [solve(upper, lower, z, z, method="lvhba", options=opts, steps=s) for s in (100, 800)]
    errs = [float((r.hparams - 0.5).norm()) for r in runs]
    assert errs[1] < 0.5 * errs[0] and errs[1] < 0.05


def test_trajectory_and_counts(problem):
    P = problem
    x0, Y0 = _start(P)
    r = solve(P.upper, P.lower, x0, Y0, data=P.data(None), blocks=2, steps=10, log_every=3)
    T = r.trajectory
    assert T.steps == (0, 3, 6, 9, 10)
    assert all(a <= b for a, b in zip(T.seconds, T.seconds[1:], strict=False))
    assert all(a < b for a, b in zip(T.n_hvps, T.n_hvps[1:], strict=False))
    assert r.upper_value == T.upper[-1] and r.n_hvps == T.n_hvps[-1]
    assert T.violation == () and r.violation is None
    seen = []
    solve(
        P.upper,
        P.lower,
        x0,
        Y0,
        data=P.data(None),
        blocks=2,
        steps=4,
        log_every=2,
        callback=lambda t, x, Y: seen.append((t, tuple(Y.shape))),
    )
    assert seen == [(0, (2, 4)), (2, (2, 4)), (4, (2, 4))]


def test_errors(problem):
    P = problem
    x0, Y0 = _start(P)
    args = (P.upper, P.lower, x0, Y0)
    kw = {"data": P.data(None), "blocks": 2, "steps": 1}
    with pytest.raises(ValueError, match="method must be one of"):
        solve(*args, method="newton", **kw)
    with pytest.raises(ValueError, match="takes options=BSVROptions"):
        solve(*args, options=LVHBAOptions(), **kw)
    with pytest.raises(ValueError, match=r"params must have shape \(3, ...\)"):
        solve(*args, data=P.data(None), blocks=3, steps=1)
    with pytest.raises(ValueError, match="use method='lvhba'"):
        solve(*args, constraint=lambda x, y: y, **kw)
    with pytest.raises(ValueError, match="beta must be in"):
        solve(*args, options=BSVROptions(beta=0.0), **kw)
    with pytest.raises(ValueError, match="MSVR's gamma infinite"):
        solve(*args, options=BSVROptions(beta=1.0, blocks_per_step=1), **kw)
    with pytest.raises(ValueError, match="solves one lower-level problem"):
        solve(*args, method="lvhba", **kw)
    with pytest.raises(ValueError, match="must return a scalar"):
        solve(P.upper, lambda x, y, b: y, x0, Y0[0], steps=1)
    with pytest.raises(FloatingPointError, match="lower the step sizes"):
        solve(P.upper, lambda x, y, b: (y / 0).sum(), x0, Y0[0], steps=1)


def test_implicit_hypergradient_matches_influence():
    # per-tensor weight decay e^x of a linear model: one implicit step from x = 0 with lr = 1 and
    # the exact y* gives x_1 = -dF/dx, to compare with hesse.influence.hypergradient
    g = torch.Generator().manual_seed(3)
    X, T = torch.randn(30, 3, generator=g, dtype=D), torch.randn(30, 2, generator=g, dtype=D)
    Xv, Tv = torch.randn(20, 3, generator=g, dtype=D), torch.randn(20, 2, generator=g, dtype=D)

    def split(y):
        return y[:6].view(2, 3), y[6:]

    def lower(x, y, b):
        W, c = split(y)
        decay = 0.5 * (torch.exp(x[0]) * (W**2).sum() + torch.exp(x[1]) * (c**2).sum())
        return F.mse_loss(X @ W.T + c, T) + decay

    def upper(x, y, b):
        W, c = split(y)
        return F.mse_loss(Xv @ W.T + c, Tv)

    x0, zero = torch.zeros(2, dtype=D), torch.zeros(8, dtype=D)
    H = torch.autograd.functional.hessian(lambda y: lower(x0, y, None), zero)
    grad0 = torch.func.grad(lambda y: lower(x0, y, None))(zero)
    y_star = -torch.linalg.solve(H, grad0)  # the lower level is quadratic: one Newton step
    opts = ImplicitOptions(lr=1.0, inner_steps=0, tol=1e-12, max_matvecs=40)
    r = solve(upper, lower, x0, y_star, method="implicit", options=opts, steps=1)
    model = nn.Linear(3, 2).double().eval()
    with torch.no_grad():
        model.weight.copy_(split(y_star)[0])
        model.bias.copy_(split(y_star)[1])
    inner = Objective(model, [(X, T)], F.mse_loss)
    outer = Objective(model, [(Xv, Tv)], F.mse_loss)
    want = hypergradient(inner, outer, torch.ones(2, dtype=D), ihvp="exact").value  # c = e^0
    assert torch.allclose(-r.hparams, want, rtol=1e-8, atol=1e-12)
    assert want.abs().min() > 1e-4  # a hypergradient that could be wrong
