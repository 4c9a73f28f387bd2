"""LDS, mislabel AUC, their bootstrap intervals, and the resumable retraining helper."""

import math

import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from hesse.influence import GroundTruth, lds, mislabel_auc, retrain_subsets
from hesse.influence.datamodels import bootstrap, spearman

DT = torch.float64


def linear_world(M=400, n=30, Q=5, noise=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = torch.rand(M, n, generator=g) < 0.5
    tau = torch.randn(Q, n, generator=g, dtype=DT)
    signal = S.double() @ tau.T
    return (
        S,
        tau,
        signal + noise * signal.std(0, keepdim=True) * torch.randn(M, Q, generator=g, dtype=DT),
    )


def test_an_exact_linear_datamodel_scores_one_whatever_the_output_kind():
    S, tau, margins = linear_world()
    assert lds(tau, S, margins, output="margin").score.value == pytest.approx(1.0)
    # hesse's scores predict the LOSS rise on removal: losses fall as helpful points are added
    assert lds(tau, S, -margins, output="loss").score.value == pytest.approx(1.0)
    assert lds(tau, S, torch.exp(margins), output="margin").score.value == pytest.approx(1.0)
    assert lds(-tau, S, margins, output="margin").score.value == pytest.approx(-1.0)


def test_noise_gives_the_gaussian_spearman_value():
    """Output = signal + noise of equal variance: Pearson 1/sqrt(2), Spearman (6/pi) asin(r/2)."""
    S, tau, out = linear_world(M=3000, Q=8, noise=1.0)
    r = lds(tau, S, out, output="margin", resamples=200)
    expected = 6 / math.pi * math.asin(2**-0.5 / 2)  # 0.6906
    assert r.score.value == pytest.approx(expected, abs=0.02)
    assert r.score.low < r.score.value < r.score.high and r.n_valid == 8 and r.n_subsets == 3000


def test_spearman_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 5, (3, 40), generator=g).double()
    b = torch.randn(3, 40, generator=g, dtype=DT)
    for i in range(3):
        assert float(spearman(a[i], b[i])) == pytest.approx(spearmanr(a[i], b[i]).statistic)
    assert spearman(torch.ones(5), torch.arange(5.0)).isnan()


def test_bootstrap_interval_covers_the_mean_about_95_percent_of_the_time():
    g, hits, trials = torch.Generator().manual_seed(2), 0, 200
    for t in range(trials):
        x = 3.0 + torch.randn(40, generator=g, dtype=DT)
        iv = bootstrap(x, lambda i, x=x: float(x[i].mean()), resamples=200, seed=t)
        hits += iv.low <= 3.0 <= iv.high
    assert 0.88 <= hits / trials <= 0.99, hits / trials


def test_mislabel_auc_equals_sklearn_with_ties():
    g = torch.Generator().manual_seed(3)
    flipped = torch.rand(300, generator=g) < 0.1
    s = torch.randint(0, 6, (300,), generator=g).double() + 2.0 * flipped
    r = mislabel_auc(s, flipped, resamples=300)
    assert r.value == pytest.approx(roc_auc_score(flipped.numpy(), s.numpy()), abs=1e-12)
    assert r.low < r.value < r.high and r.confidence == 0.95
    with pytest.raises(ValueError, match="flipped and clean"):
        mislabel_auc(s, torch.zeros(300, dtype=torch.bool))


def test_retraining_resumes_where_it_stopped(tmp_path):
    calls = []

    def train(indices, seed):
        calls.append(seed)
        return torch.stack([indices.double().mean(), torch.tensor(float(seed))])

    path = tmp_path / "truth.pt"
    first = retrain_subsets(train, 20, n_subsets=3, alpha=0.3, seed=10, path=path)
    again = retrain_subsets(train, 20, n_subsets=5, alpha=0.3, seed=10, path=path)
    assert calls == [10, 11, 12, 13, 14] and isinstance(again, GroundTruth)
    assert torch.equal(again.subsets[:3], first.subsets) and again.subsets.sum(1).eq(6).all()
    assert torch.equal(again.outputs[:, 1], torch.arange(10.0, 15.0, dtype=DT))
    mean_index = (again.subsets.double() * torch.arange(20.0)).sum(1) / 6
    assert torch.allclose(again.outputs[:, 0], mean_index)
    assert not (tmp_path / "truth.pt.tmp").exists()
    with pytest.raises(ValueError, match="alpha=0.3.*delete it"):
        retrain_subsets(train, 20, n_subsets=5, alpha=0.5, seed=10, path=path)


def test_lds_refuses_mismatched_shapes():
    S, tau, out = linear_world(M=10)
    with pytest.raises(ValueError, match=r"outputs \(M, n_query\)"):
        lds(tau, S, out[:, :2])
    with pytest.raises(ValueError, match="output must be one of"):
        lds(tau, S, out, output="accuracy")
