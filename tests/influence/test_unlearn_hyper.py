"""unlearn() against retraining, hypergradient() against finite differences of retraining."""

import pytest
import torch
import torch.nn.functional as F
from influence_problems import DT, blobs, fit, flat, load, mean_loss, trained
from torch import nn

from hesse import Objective
from hesse.influence import hypergradient, unlearn

LAM = 0.05


@pytest.fixture(scope="module")
def problem():
    model, x, y, theta = trained(n=150, lam=LAM)
    keep = torch.ones(150, dtype=torch.bool)
    keep[:8] = False  # the forget set: the first 8 points
    retrained = fit(x[keep], y[keep], 3, LAM, start=theta)
    return model, x, y, theta, keep, retrained


def remain_objective(theta, x, y, keep):
    return float(mean_loss(theta, x[keep], y[keep], 3) + LAM / 2 * theta @ theta)


@pytest.mark.parametrize("ihvp", ["exact", "cg"])
def test_newton_lands_near_the_retrained_model(problem, ihvp):
    model, x, y, theta, keep, retrained = problem
    r = unlearn(
        model,
        [(x[~keep], y[~keep])],
        [(x[keep], y[keep])],
        F.cross_entropy,
        weight_decay=LAM,
        ihvp=ihvp,
    )
    new = flat(r.model)
    assert torch.equal(flat(model), theta), "the original model changed"
    assert r.method == "newton" and r.inverse.converged and (r.n_forget, r.n_remain) == (8, 142)
    assert torch.allclose(new - theta, r.delta)
    # one Newton step on a smooth convex objective: quadratic convergence from close by
    assert (new - retrained).norm() < 0.05 * (theta - retrained).norm()


def test_iau_step_lowers_the_remaining_objective(problem):
    model, x, y, theta, keep, retrained = problem
    r = unlearn(
        model,
        [(x[~keep], y[~keep])],
        [(x[keep], y[keep])],
        F.cross_entropy,
        method="iau",
        weight_decay=LAM,
    )
    new = flat(r.model)
    assert r.step_size > 0 and r.n_matvecs == 1 and r.inverse is None
    assert remain_objective(new, x, y, keep) < remain_objective(theta, x, y, keep)
    assert (new - retrained).norm() < (theta - retrained).norm()
    lr = unlearn(
        model, [(x[~keep], y[~keep])], [(x[keep], y[keep])], F.cross_entropy, method="iau", lr=0.5
    )
    assert lr.step_size == pytest.approx(0.5 * 8 / 150)


def test_unlearn_refuses_bad_settings(problem):
    model, x, y, *_ = problem
    data = [(x, y)]
    for kwargs, match in [
        ({"method": "retrain"}, "method must be one of"),
        ({"ihvp": "woodbury"}, "ihvp must be"),
        ({"weight_decay": -1.0}, "weight_decay must be >= 0"),
        ({"curvature": "kfac"}, "curvature must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            unlearn(model, data, data, F.cross_entropy, **kwargs)


def validation(theta):
    xv, yv = blobs(40, seed=9)
    return float(mean_loss(theta, xv, yv, 3))


def objectives(model, x, y):
    xv, yv = blobs(40, seed=9)
    return Objective(model, [(x, y)], F.cross_entropy), Objective(
        model, [(xv, yv)], F.cross_entropy
    )


@pytest.mark.parametrize("ihvp", ["exact", "cg", "lissa"])
def test_hypergradient_of_weight_decay_equals_finite_differences(problem, ihvp):
    model, x, y, theta, *_ = problem
    inner, outer = objectives(model, x, y)
    r = hypergradient(inner, outer, torch.tensor(LAM, dtype=DT), ihvp=ihvp)
    h = 1e-5
    fd = (
        validation(fit(x, y, 3, LAM + h, start=theta))
        - validation(fit(x, y, 3, LAM - h, start=theta))
    ) / (2 * h)  # noqa: E501
    assert r.stationarity < 1e-10 and r.outer_value == pytest.approx(validation(theta))
    assert float(r.value) == pytest.approx(fd, rel=1e-5)


def test_per_tensor_and_custom_penalties_equal_finite_differences():
    x, y = blobs(120)
    c = torch.tensor([0.05, 0.2], dtype=DT)  # decay of the weight, of the bias
    decay = torch.cat([c[0].expand(9), c[1].expand(3)])
    theta = fit(x, y, 3, 0.0, decay=decay)
    model = load(nn.Linear(3, 3).to(DT), theta).eval()
    inner, outer = objectives(model, x, y)
    r = hypergradient(inner, outer, c)
    h, fd = 1e-5, []
    for j in range(2):
        step = torch.cat([torch.full((9,), h * (j == 0)), torch.full((3,), h * (j == 1))])
        up = validation(fit(x, y, 3, 0.0, decay=decay + step.to(DT), start=theta))
        down = validation(fit(x, y, 3, 0.0, decay=decay - step.to(DT), start=theta))
        fd.append((up - down) / (2 * h))
    assert torch.allclose(r.value, torch.tensor(fd, dtype=DT), rtol=1e-5)
    # the same with a user penalty: log-parametrized decays, d/dlog c = c d/dc
    log_c = c.log()

    def penalty(t, hp):
        cc = torch.cat([hp[0].exp().expand(9), hp[1].exp().expand(3)])
        return 0.5 * (cc * t**2).sum()

    rl = hypergradient(inner, outer, log_c, penalty=penalty, damping=0.0, ihvp="exact")
    assert torch.allclose(rl.value, c * r.value, rtol=1e-8)


def test_hypergradient_refuses_other_parameters(problem):
    model, x, y, *_ = problem
    inner = Objective(model, [(x, y)], F.cross_entropy)
    outer = Objective(model, [(x, y)], F.cross_entropy, params=["weight"])
    with pytest.raises(ValueError, match="other parameters"):
        hypergradient(inner, outer, torch.tensor(0.1, dtype=DT))
    with pytest.raises(ValueError, match="one per parameter tensor"):
        hypergradient(inner, inner, torch.ones(5, dtype=DT))
