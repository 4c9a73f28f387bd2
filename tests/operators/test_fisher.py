"""FisherOperator: empirical equals the dense reference; Monte-Carlo is unbiased for the GGN."""

import pytest
import torch

import hesse
from cases import WITH_LOSS, dense, objective


@pytest.mark.parametrize("name", WITH_LOSS)
def test_empirical_fisher_matches_reference(name, assert_operator_matches):
    op = hesse.FisherOperator(objective(name), kind="empirical")
    assert_operator_matches(op, dense("fisher", name))


@pytest.mark.parametrize("kind", ["empirical", "mc"])
def test_fisher_is_tagged_psd(kind):
    assert {"symmetric", "psd"} <= hesse.FisherOperator(objective("mlp_ce"), kind=kind).tags


def _mc_quadratic_forms(obj, V, mc_samples, seeds):
    """V^T F_s V (k, k) for each seed's Monte-Carlo Fisher; one data pass each."""
    out = []
    for s in seeds:
        op = hesse.FisherOperator(obj, kind="mc", mc_samples=mc_samples, seed=s)
        out.append(V.T @ (op @ V))
    return torch.stack(out)


@pytest.fixture(scope="module")
def mc_runs():
    """V^T F_s V over 120 seeds with mc_samples=1 and over 60 seeds with mc_samples=4."""
    obj = objective("mlp_ce")
    V = torch.randn(obj.dim, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q1 = _mc_quadratic_forms(obj, V, mc_samples=1, seeds=range(120))
    q4 = _mc_quadratic_forms(obj, V, mc_samples=4, seeds=range(1000, 1060))
    return V, q1, q4


def test_mc_fisher_is_unbiased_for_the_ggn_with_cross_entropy(mc_runs):
    # For softmax cross-entropy the true Fisher E_{y~p}[g g^T] equals the GGN exactly, and the
    # MC estimate with sampled labels is unbiased for it. Over S seeds the mean of V^T F_s V must
    # lie within a few standard errors (spread over seeds / sqrt(S)) of V^T G V. Six distinct
    # entries at 5 sigma: a false alarm has probability ~1e-5 (a bit more with heavy tails).
    V, q, _ = mc_runs
    want = V.T @ dense("ggn", "mlp_ce") @ V
    stderr = q.std(0) / len(q) ** 0.5
    assert (stderr > 0).all(), "MC samples should differ between seeds"
    z = (q.mean(0) - want) / stderr
    assert z.abs().max() < 5, z


def test_mc_fisher_variance_falls_as_one_over_mc_samples(mc_runs):
    # Each estimate averages N * mc_samples independent terms, so var(M=1) / var(M=4) = 4; with
    # 120 and 60 seeds the sample variances are good to ~20-30% (heavy tails): accept [1.5, 10].
    _, q1, q4 = mc_runs
    ratio = (q1.diagonal(dim1=1, dim2=2).var(0) / q4.diagonal(dim1=1, dim2=2).var(0)).mean()
    assert 1.5 < ratio.item() < 10, ratio


def test_mc_fisher_same_seed_same_numbers():
    obj = objective("mlp_ce")
    v = torch.ones(obj.dim, dtype=torch.float64)
    a = hesse.FisherOperator(obj, kind="mc", seed=3) @ v
    b = hesse.FisherOperator(obj, kind="mc", seed=3) @ v
    c = hesse.FisherOperator(obj, kind="mc", seed=4) @ v
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
