"""Sinkhorn and Sinkhorn-Newton-Sparse against dense references, in float64."""

import sys

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from hesse.ot import OTResult, sinkhorn, sinkhorn_newton

sns_module = sys.modules["hesse.ot.sinkhorn_newton"]


def problem(n=40, m=30, seed=0, p=2):
    """Point clouds in 2-D with random positive masses; cost ||x - y||^p scaled to max 1."""
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, 2)), rng.normal(size=(m, 2)) + 0.5
    C = np.linalg.norm(x[:, None] - y[None], axis=-1) ** p
    a, b = rng.uniform(0.5, 1.5, n), rng.uniform(0.5, 1.5, m)
    return a / a.sum(), b / b.sum(), C / C.max()


def reference_plan(a, b, C, reg, sweeps=200_000):
    """Long log-domain Sinkhorn with log-sum-exp (the textbook algorithm), to round-off."""
    f, g = np.zeros_like(a), np.zeros_like(b)
    for _ in range(sweeps):
        f = reg * (np.log(a) - logsumexp((g[None] - C) / reg, axis=1))
        g = reg * (np.log(b) - logsumexp((f[:, None] - C) / reg, axis=0))
        P = np.exp((f[:, None] + g[None] - C) / reg)
        if np.abs(P.sum(1) - a).sum() < 1e-14:
            return P
    raise AssertionError("reference Sinkhorn did not converge")


@pytest.mark.parametrize("reg", [0.1, 0.01, 0.002])
def test_plan_matches_long_log_sinkhorn(reg):
    a, b, C = problem()
    r = sinkhorn_newton(a, b, C, reg)
    assert isinstance(r, OTResult) and r.converged
    assert r.marginal_error <= 1e-9
    np.testing.assert_allclose(r.plan, reference_plan(a, b, C, reg), atol=1e-10, rtol=0)
    assert r.cost == pytest.approx(float(np.vdot(C, r.plan)), abs=1e-15)


def test_small_reg_where_the_plain_kernel_underflows():
    a, b, C = problem(n=60, m=50, seed=3, p=1)
    reg = 1e-3  # exp(-C/reg) underflows to 0 in places: the plain kernel has zero entries
    assert (np.exp(-C / reg) == 0).any()
    r = sinkhorn_newton(a, b, C, reg, sinkhorn_steps=20)
    assert r.converged and r.newton_iterations > 0
    np.testing.assert_allclose(r.plan.sum(1), a, atol=1e-9, rtol=0)
    np.testing.assert_allclose(r.plan.sum(0), b, atol=1e-9, rtol=0)
    s = sinkhorn(a, b, C, reg)
    assert s.converged
    assert r.cost == pytest.approx(s.cost, abs=1e-8)
    assert r.sinkhorn_iterations + r.newton_iterations < s.sinkhorn_iterations / 5


def test_strong_duality_and_primal_objective():
    a, b, C = problem(seed=1)
    reg = 0.02
    r = sinkhorn_newton(a, b, C, reg, tol=1e-12)
    P = r.plan
    primal = np.vdot(C, P) + reg * np.sum(P * (np.log(P) - 1))
    assert r.objective == pytest.approx(primal, abs=1e-13)
    assert r.dual == pytest.approx(r.objective, abs=1e-11)


def test_sparse_hessian_at_zero_threshold_is_the_dense_hessian():
    a, b, C = problem(n=7, m=5, seed=2)
    reg = 0.05
    f, g = (
        np.random.default_rng(0).normal(size=7) * 0.1,
        np.random.default_rng(1).normal(size=5) * 0.1,
    )
    Ct, at, bt = (torch.tensor(v) for v in (C, a, b))

    def dual(z):
        L = (z[:7, None] + z[None, 7:] - Ct) / reg
        return at @ z[:7] + bt @ z[7:] - reg * torch.exp(L).sum()

    H = torch.func.hessian(dual)(torch.tensor(np.concatenate([f, g]))).numpy()
    P = np.exp((f[:, None] + g[None] - C) / reg)
    M = sns_module.sparse_hessian(P, 0.0).toarray()
    np.testing.assert_allclose(M, -reg * H, atol=1e-12, rtol=1e-12)
    M_sparse = sns_module.sparse_hessian(P, 0.5)
    assert M_sparse.nnz < M.size - 7 * 5 and np.all(np.linalg.eigvalsh(M_sparse.toarray()) > 0)


def test_exact_newton_converges_in_few_steps():
    a, b, C = problem(seed=4)
    r = sinkhorn_newton(a, b, C, 0.01, threshold=0.0, tol=1e-12, sinkhorn_steps=20, cg_tol=1e-12)
    assert r.converged and r.newton_iterations <= 6
    errors = np.array(r.errors[-3:])
    assert errors[-1] < 1e-3 * errors[0]  # faster than linear at the end


def test_sinkhorn_alone_agrees_and_reports_checks():
    a, b, C = problem(seed=5)
    s = sinkhorn(a, b, C, 0.05, check_every=5)
    r = sinkhorn_newton(a, b, C, 0.05)
    assert s.converged and s.newton_iterations == 0 and s.sinkhorn_iterations % 5 == 0
    assert len(s.errors) == s.sinkhorn_iterations // 5
    np.testing.assert_allclose(s.plan, r.plan, atol=1e-9, rtol=0)


def test_budget_exhausted_says_not_converged():
    a, b, C = problem(seed=6)
    r = sinkhorn_newton(a, b, C, 1e-3, sinkhorn_steps=1, max_newton=1)
    assert not r.converged and r.marginal_error > 1e-9 and r.newton_iterations == 1


@pytest.mark.parametrize(
    ("a", "b", "C", "reg", "match"),
    [
        (np.ones(3) / 3, np.ones(2) / 2, np.ones((2, 3)), 0.1, "expected a"),
        (np.array([0.5, 0.5, 0.0]), np.ones(2) / 2, np.ones((3, 2)), 0.1, "> 0"),
        (np.ones(3) / 3, np.ones(2), np.ones((3, 2)), 0.1, "same total mass"),
        (np.ones(3) / 3, np.ones(2) / 2, np.full((3, 2), np.inf), 0.1, "non-finite"),
        (np.ones(3) / 3, np.ones(2) / 2, np.ones((3, 2)), 0.0, "reg must be"),
    ],
)
def test_bad_inputs_raise_with_a_fix(a, b, C, reg, match):
    with pytest.raises(ValueError, match=match):
        sinkhorn_newton(a, b, C, reg)


def test_bad_threshold_raises():
    a, b, C = problem()
    with pytest.raises(ValueError, match="threshold"):
        sinkhorn_newton(a, b, C, 0.1, threshold=2.0)
