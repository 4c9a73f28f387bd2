"""density (stochastic Lanczos quadrature): quadrature weights, normalization, moments."""

import numpy as np
import pytest
import torch

import hesse
from cases import DT, dense, objective, sym_matrix

D = 100


def matrix():
    return sym_matrix(torch.randn(D, generator=torch.Generator().manual_seed(7), dtype=DT), seed=7)


@pytest.fixture(scope="module")
def slq():
    return hesse.density(matrix(), steps=30, probes=50, seed=0)


def test_shapes_and_weights_sum_to_one(slq):
    assert slq.nodes.shape == (50, 30) and slq.weights.shape == (50, 30)
    assert slq.nodes.dtype == torch.float64
    w = torch.as_tensor(slq.weights, dtype=DT)
    assert torch.allclose(w.sum(1), torch.ones(50, dtype=DT), atol=1e-10, rtol=0)
    assert (w >= -1e-12).all()
    lo, hi = slq.support
    assert lo <= slq.nodes.min().item() and slq.nodes.max().item() <= hi


@pytest.mark.parametrize("sigma", [None, 0.05, 0.5])
def test_smoothed_density_integrates_to_one(slq, sigma):
    lo, hi = slq.support
    width = hi - lo
    grid = torch.linspace(lo - width, hi + width, 6001, dtype=DT)
    s = torch.as_tensor(np.asarray(slq(grid, sigma=sigma)), dtype=DT)
    assert s.shape == grid.shape
    assert (s >= 0).all()
    assert torch.trapezoid(s, grid).item() == pytest.approx(1.0, abs=1e-3)


def test_first_two_moments_match_trace_over_d(slq):
    # Gauss quadrature is exact for x and x^2, so each probe's moments are unbiased estimates of
    # tr(A)/d and tr(A^2)/d; their mean lies within a few standard errors of the truth.
    A = matrix()
    nodes, w = torch.as_tensor(slq.nodes, dtype=DT), torch.as_tensor(slq.weights, dtype=DT)
    for power, exact in ((1, torch.trace(A) / D), (2, torch.trace(A @ A) / D)):
        per_probe = (w * nodes**power).sum(1)
        se = per_probe.std() / len(per_probe) ** 0.5
        assert abs(per_probe.mean() - exact) <= 4 * se, power


def test_trace_estimate(slq):
    exact = torch.trace(matrix()).item()
    assert abs(slq.trace_estimate.value - exact) <= 4 * slq.trace_estimate.stderr
    assert slq.n_matvecs <= 30 * 50


def test_nodes_are_the_eigenvalues_when_steps_reach_d():
    d = 20
    evals = torch.linspace(-3, 4, d, dtype=DT)
    s = hesse.density(sym_matrix(evals, seed=8), steps=d, probes=3, seed=0)
    for p in range(3):
        got = torch.as_tensor(s.nodes[p], dtype=DT).sort().values
        assert (got - evals).abs().max().item() <= 1e-8


def test_density_of_model_hessian_runs_and_brackets_the_spectrum():
    op = hesse.HessianOperator(objective("mlp_ce"))
    s = hesse.density(op, steps=15, probes=2, seed=0)
    assert s.nodes.shape == (2, 15)
    assert torch.allclose(torch.as_tensor(s.weights).sum(1), torch.ones(2, dtype=DT), atol=1e-10)
    evals = torch.linalg.eigvalsh(dense("hessian", "mlp_ce"))
    tol = 1e-8 * evals.abs().max()
    assert evals[0] - tol <= s.nodes.min() and s.nodes.max() <= evals[-1] + tol  # Ritz values


def test_float32_low_rank_operator_closes_probes_without_nan():
    torch.manual_seed(0)
    model = torch.nn.Linear(20, 3)
    data = (torch.randn(2, 20), torch.tensor([0, 2]))
    G = hesse.GGNOperator(hesse.Objective(model, data, loss=torch.nn.functional.cross_entropy))
    s = hesse.density(G, steps=30, probes=3, seed=0)  # rank(G) <= 4: every probe closes early
    assert torch.isfinite(s.nodes).all() and torch.isfinite(s.weights).all()
    assert torch.allclose(s.weights.sum(1), torch.ones(3, dtype=torch.float64), atol=1e-5)
