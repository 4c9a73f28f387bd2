"""Gradient-normalized smoothness Newton: the step against dense algebra, global convergence."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hesse import Objective
from hesse.operators.reference import dense_hessian
from hesse.optim import GNSNewton, gns_accept, gns_newton, gns_step


def softmax_problem(n=60, d=4, k=3, seed=0):
    """Softmax regression on noisy labels (not separable, so the minimizer is finite)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    y = torch.where(torch.rand(n, generator=gen) < 0.2, torch.randint(0, k, (n,), generator=gen), y)
    torch.manual_seed(seed)
    model = nn.Linear(d, k).double()
    return model, x, y


def test_step_is_the_damped_newton_solve():
    model, x, y = softmax_problem()
    obj = Objective(model, [(x, y)], loss=F.cross_entropy)
    H, g = dense_hessian(obj), obj.gradient()
    delta, lam, res = gns_step(H, g, 0.3, tol=1e-13, max_matvecs=200)
    assert lam == pytest.approx(float(g.norm()) / 0.3, rel=1e-15)
    expected = -torch.linalg.solve(H + lam * torch.eye(H.shape[0], dtype=H.dtype), g)
    torch.testing.assert_close(delta, expected, atol=1e-11, rtol=1e-9)
    assert res.converged


def test_accept_rule():
    assert gns_accept(1.0, 0.5, 1.0, 1.0)  # 0.5 >= 1/8
    assert not gns_accept(1.0, 0.99, 1.0, 1.0)


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "fisher", "kfac"])
def test_full_batch_reaches_tolerance_with_each_curvature(curvature):
    model, x, y = softmax_problem()
    obj = Objective(model, [(x, y)], loss=F.cross_entropy)
    r = gns_newton(obj, curvature=curvature, tol=1e-10, max_iter=200, max_matvecs=200)
    assert r.converged and r.grad_norm <= 1e-10
    assert float(obj.gradient().norm()) <= 1e-10  # the objective holds the final point
    ref = Objective(softmax_problem()[0], [(x, y)], loss=F.cross_entropy)
    exact = gns_newton(ref, curvature="hessian", tol=1e-12, max_matvecs=200)
    assert r.loss == pytest.approx(exact.loss, abs=1e-12)
    losses = [h[0] for h in r.history]
    assert all(b <= a + 1e-14 for a, b in zip(losses, losses[1:], strict=False))  # monotone


def test_exact_hessian_needs_few_iterations_and_beats_bad_gamma():
    model, x, y = softmax_problem(seed=1)
    obj = Objective(model, [(x, y)], loss=F.cross_entropy)
    r = gns_newton(obj, gamma=1e-4, tol=1e-10, max_matvecs=200)
    assert r.converged and r.iterations <= 30  # gamma adapts up from a tiny start


def test_optimizer_shell_converges_like_the_function():
    model, x, y = softmax_problem(n=30, d=2, seed=2)
    opt = GNSNewton(model.parameters(), max_matvecs=30)
    norms = []
    for _ in range(12):
        opt.step(lambda: F.cross_entropy(model(x), y))
        norms.append(float(Objective(model, [(x, y)], loss=F.cross_entropy).gradient().norm()))
    assert norms[-1] < 1e-9 < norms[0]


def test_bad_arguments_raise():
    model, x, y = softmax_problem()
    obj = Objective(model, [(x, y)], loss=F.cross_entropy)
    with pytest.raises(ValueError, match="curvature must be one of"):
        gns_newton(obj, curvature="bfgs")
    with pytest.raises(ValueError, match="gamma must be > 0"):
        gns_newton(obj, gamma=0.0)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        GNSNewton(model.parameters(), gamma=-1.0)


def test_callable_curvature_is_used_at_every_iterate():
    model, x, y = softmax_problem(seed=3)
    obj = Objective(model, [(x, y)], loss=F.cross_entropy)
    calls = []

    def dense(o):
        calls.append(1)
        return dense_hessian(o)

    r = gns_newton(obj, curvature=dense, tol=1e-10, max_matvecs=200)
    ref = gns_newton(
        Objective(softmax_problem(seed=3)[0], [(x, y)], loss=F.cross_entropy),
        tol=1e-10,
        max_matvecs=200,
    )
    assert r.converged and len(calls) == r.iterations
    assert r.iterations == ref.iterations
    assert r.loss == pytest.approx(ref.loss, abs=1e-13)  # weights: unique up to the softmax shift
