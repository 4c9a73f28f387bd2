import math

import pytest
import torch
import torch.nn.functional as F
from optim_models import closure, data, dense_hessian, mlp, params_vector

from hesse.optim import MFAC, NewtonCG


def _grad(model, x, y):
    g = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    return torch.cat([t.reshape(-1) for t in g])


def test_mfac_steps_with_the_inverse_of_the_damped_window_fisher():
    x, y = data(n=24)
    model = mlp()
    lr, m, lam = 0.05, 3, 0.1
    opt = MFAC(model.parameters(), lr=lr, m=m, damping=lam)
    window = []
    for i in range(5):
        batch = slice(4 * i, 4 * i + 4)
        g = _grad(model, x[batch], y[batch])
        window = (window + [g])[-m:]
        G = torch.stack(window)
        F_dense = lam * torch.eye(len(g), dtype=g.dtype) + G.T @ G / len(window)
        before = params_vector(model)
        opt.step(closure(model, x[batch], y[batch]))
        step = params_vector(model) - before
        assert torch.allclose(step, -lr * torch.linalg.solve(F_dense, g), rtol=1e-9, atol=1e-12)
    assert opt.fisher.m == m


def test_newton_cg_takes_the_regularized_newton_step():
    x, y = data()
    model = mlp()
    H = dense_hessian(model, x, y)
    g = _grad(model, x, y)
    lam, L = 0.3, 2.0
    reg = lam + math.sqrt(L * g.norm().item())
    want = -torch.linalg.solve(H + reg * torch.eye(len(g), dtype=g.dtype), g)
    before = params_vector(model)
    opt = NewtonCG(model.parameters(), damping=lam, regularization=L, max_matvecs=200, tol=1e-12)
    opt.step(closure(model, x, y))
    assert opt.last_solve.converged
    assert torch.allclose(params_vector(model) - before, want, rtol=1e-8, atol=1e-12)


def test_newton_cg_lowers_the_loss_on_a_small_problem():
    x, y = data()
    model = mlp()
    opt = NewtonCG(model.parameters(), damping=0.1, regularization=1.0, max_matvecs=20)
    losses = [float(opt.step(closure(model, x, y))) for _ in range(10)]
    assert losses[-1] < 0.5 * losses[0]


def test_bad_hyper_parameters_are_refused():
    with pytest.raises(ValueError, match="damping"):
        MFAC(mlp().parameters(), damping=0.0)
    with pytest.raises(ValueError, match="damping"):
        NewtonCG(mlp().parameters(), damping=-1.0)


def test_mfac_without_closure_or_gradient_is_refused():
    with pytest.raises(ValueError, match="no gradient"):
        MFAC(mlp().parameters()).step()


def test_mfac_steps_from_gradients_set_by_backward():
    x, y = data()
    model = mlp()
    opt = MFAC(model.parameters(), lr=0.1, m=2, damping=0.1)
    before = params_vector(model)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert not torch.equal(params_vector(model), before)
