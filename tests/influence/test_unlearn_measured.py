r"""unlearn(ihvp="kfac" | "ekfac"): Newton's step through the Kronecker factors' exact inverse.

Against a dense reference on an L2 logistic regression (float64): the step equals
:math:`-(K + w I)^{-1} (\nabla L_R + w\theta)` with ``K`` the dense KFAC/EK-FAC matrix of the
remaining objective, and the unlearned model is closer to the retrained one than the original.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from influence_problems import fit, flat, load, trained

from hesse import EKFACOperator, KFACOperator, Objective, reference
from hesse.influence import unlearn

LAM = 0.05
OPERATORS = {"kfac": KFACOperator, "ekfac": EKFACOperator}
KINDS = {"ggn": "exact", "fisher": "empirical"}


@pytest.fixture(scope="module")
def problem():
    model, x, y, theta = trained(n=150, lam=LAM)
    keep = torch.ones(150, dtype=torch.bool)
    keep[:10] = False
    forget, remain = [(x[~keep], y[~keep])], [(x[keep], y[keep])]
    retrained = fit(x[keep], y[keep], 3, LAM, start=theta)
    return model, theta, forget, remain, retrained


@pytest.mark.parametrize("ihvp", ["kfac", "ekfac"])
@pytest.mark.parametrize("curvature", [None, "ggn", "fisher"])
def test_kronecker_newton_step_matches_the_dense_factors(problem, ihvp, curvature):
    model, theta, forget, remain, retrained = problem
    r = unlearn(
        model, forget, remain, F.cross_entropy, weight_decay=LAM, ihvp=ihvp, curvature=curvature
    )
    obj = Objective(model, remain, F.cross_entropy)
    K = OPERATORS[ihvp](obj, kind=KINDS[curvature or "ggn"]).to_dense().double()
    g = obj.gradient().double() + LAM * theta
    expected = -torch.linalg.solve(K + LAM * torch.eye(len(theta), dtype=K.dtype), g)
    assert r.inverse.method == ihvp and r.inverse.converged
    assert r.inverse.approximates == (curvature or "ggn")
    torch.testing.assert_close(r.delta, expected, rtol=1e-8, atol=1e-10)
    assert torch.equal(flat(model), theta), "the original model changed"
    new = flat(r.model)
    # the empirical Fisher is the cruder curvature: a smaller gain, still a gain
    gain = 0.7 if curvature == "fisher" else 0.5
    assert (new - retrained).norm() < gain * (theta - retrained).norm()


def test_kronecker_ihvp_refuses_the_hessian(problem):
    model, _, forget, remain, _ = problem
    with pytest.raises(ValueError, match="Kronecker-factored approximation"):
        unlearn(model, forget, remain, F.cross_entropy, ihvp="kfac", curvature="hessian")
    with pytest.raises(ValueError, match="ihvp must be one of"):
        unlearn(model, forget, remain, F.cross_entropy, ihvp="woodbury")


def test_iau_ignores_the_kronecker_ihvp(problem):
    model, _, forget, remain, _ = problem
    kw = {"method": "iau", "weight_decay": LAM}
    a = unlearn(model, forget, remain, F.cross_entropy, ihvp="ekfac", **kw)
    b = unlearn(model, forget, remain, F.cross_entropy, **kw)
    assert a.step_size == pytest.approx(b.step_size, rel=1e-12)


@pytest.mark.parametrize("ihvp", ["exact", "ekfac"])
def test_influence_step_equals_newton_at_a_minimum(problem, ihvp):
    model, theta, forget, remain, _ = problem
    kw = {"weight_decay": LAM, "ihvp": ihvp, "curvature": "ggn"}
    newton = unlearn(model, forget, remain, F.cross_entropy, **kw)
    infl = unlearn(model, forget, remain, F.cross_entropy, method="influence", **kw)
    # trained to round-off: the full objective's gradient vanishes, so the right-hand sides agree
    assert newton.residual < 1e-8 and infl.residual == pytest.approx(newton.residual)
    torch.testing.assert_close(infl.delta, newton.delta, rtol=1e-7, atol=1e-10)


def test_influence_step_ignores_the_residual_gradient(problem):
    """Away from a minimum Newton also finishes training; the influence step does not."""
    model, theta, forget, remain, _ = problem
    shifted = theta + 0.3 * torch.linspace(-1, 1, len(theta), dtype=theta.dtype)
    moved = load(copy.deepcopy(model), shifted)
    kw = {"weight_decay": LAM, "ihvp": "exact", "curvature": "ggn"}
    newton = unlearn(moved, forget, remain, F.cross_entropy, **kw)
    infl = unlearn(moved, forget, remain, F.cross_entropy, method="influence", **kw)
    obj = Objective(moved, remain, F.cross_entropy)
    H = reference.dense_ggn(obj).double() + LAM * torch.eye(len(theta), dtype=theta.dtype)
    g_r = obj.gradient().double()
    g_f = Objective(moved, forget, F.cross_entropy).gradient().double()
    share = 10 / 150
    expected = -torch.linalg.solve(H, share * (g_r - g_f))
    torch.testing.assert_close(infl.delta, expected, rtol=1e-6, atol=1e-9)
    full = (1 - share) * g_r + share * g_f + LAM * shifted
    assert infl.residual == pytest.approx(float(full.norm() / (share * (g_r - g_f)).norm()))
    assert infl.residual > 1 and (newton.delta - infl.delta).norm() > infl.delta.norm()
