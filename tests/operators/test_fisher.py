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


def test_mc_fisher_is_unbiased_for_the_ggn_with_cross_entropy():
    # For softmax cross-entropy the true Fisher E_{y~p}[g g^T] equals the GGN exactly, and the
    # MC estimate with sampled labels is unbiased for it. Over S seeds the mean of V^T F_s V must
    # lie within a few standard errors (spread over seeds / sqrt(S)) of V^T G V. Six distinct
    # entries at 5 sigma: a false alarm has probability ~1e-5.
    obj = objective("mlp_ce")
    V = torch.randn(obj.dim, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = _mc_quadratic_forms(obj, V, mc_samples=4, seeds=range(200))
    want = V.T @ dense("ggn", "mlp_ce") @ V
    stderr = q.std(0) / len(q) ** 0.5
    assert (stderr > 0).all(), "MC samples should differ between seeds"
    z = (q.mean(0) - want) / stderr
    assert z.abs().max() < 5, z
    # ...and the estimate is not the GGN itself (it is sampled): relative spread is visible.
    assert (q.std(0).diagonal() / want.diagonal()).min() > 1e-3


def test_mc_fisher_variance_falls_as_one_over_mc_samples():
    # Each estimate averages N * mc_samples independent terms, so var(M=1) / var(M=8) = 8; with
    # 150 seeds the sample variances are good to ~25% (heavy tails included): accept [3, 24].
    obj = objective("mlp_ce")
    V = torch.randn(obj.dim, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v1 = _mc_quadratic_forms(obj, V, 1, range(1000, 1150)).diagonal(dim1=1, dim2=2).var(0)
    v8 = _mc_quadratic_forms(obj, V, 8, range(2000, 2150)).diagonal(dim1=1, dim2=2).var(0)
    ratio = (v1 / v8).mean().item()
    assert 3 < ratio < 24, ratio


def test_mc_fisher_same_seed_same_numbers():
    obj = objective("mlp_ce")
    v = torch.ones(obj.dim, dtype=torch.float64)
    a = hesse.FisherOperator(obj, kind="mc", seed=3) @ v
    b = hesse.FisherOperator(obj, kind="mc", seed=3) @ v
    c = hesse.FisherOperator(obj, kind="mc", seed=4) @ v
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
