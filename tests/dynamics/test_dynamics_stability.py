"""stability(): thresholds per optimizer, verdicts from hesse.analysis against dense values."""

import pytest
import torch
from dynamics_problems import data, dense_hessian, objective

from hesse.dynamics import stability


def test_gd_threshold_and_verdict_match_the_dense_sharpness():
    obj = objective()
    lam = float(torch.linalg.eigvalsh(dense_hessian(obj)).max())
    for lr, status in ((1.0 / lam, "stable"), (2.0 / lam, "edge"), (3.0 / lam, "unstable")):
        s = stability(obj, lr)
        assert s.lambda_max == pytest.approx(lam, rel=1e-8)
        assert s.thresholds == {"gd": pytest.approx(2 / lr)}
        assert [v.status for v in s.verdicts] == [status]
        assert s.trace is None and s.n_samples == 24


def test_sgd_minibatches_measure_the_per_sample_spread_against_dense_values():
    obj = objective(batch=8)
    H = dense_hessian(obj)
    x, y = data()
    per_sample = [dense_hessian(objective_of(obj, x[i : i + 1], y[i : i + 1])) for i in range(24)]
    s = stability(obj, 0.05, batch_size=8, budget=90)
    assert set(s.thresholds) == {"gd", "sgd"}
    sgd = s.verdicts[1]
    assert sgd.quantity == "batch_moment" and sgd.threshold == pytest.approx(40.0)
    lo, hi = s.trace.ci95
    assert lo - 1e-9 <= float(torch.trace(H)) <= hi + 1e-9  # Hutch++ interval (seeded)
    noise = s.noise
    assert (noise.batch_size, noise.n_samples) == (8, 24)
    _, lo, hi = noise.frobenius
    assert lo - 1e-9 <= float(H.square().sum()) <= hi + 1e-9
    _, lo, hi = noise.sample_frobenius
    assert lo - 1e-9 <= float(sum(Hi.square().sum() for Hi in per_sample) / 24) <= hi + 1e-9
    top = max(float(torch.linalg.eigvalsh(Hi).max()) for Hi in per_sample)
    assert top <= noise.sample_sharpness <= top * (1 + 1e-3)  # Ritz value + residual, tol 1e-4


def test_past_max_samples_the_mean_is_estimated_and_no_stability_is_claimed():
    s = stability(objective(batch=8), 0.05, batch_size=8, max_samples=10)
    assert s.noise.sample_sharpness is None and s.verdicts[1].status != "stable"
    assert s.noise.sample_frobenius[1] < s.noise.sample_frobenius[2]  # a t-interval


def test_momentum_raises_the_gd_threshold_and_drops_the_sgd_criterion():
    s = stability(objective(), 0.1, momentum=0.9, batch_size=8)
    assert s.thresholds == {"gd": pytest.approx(38.0)}
    assert s.verdicts[0].threshold == pytest.approx(38.0)
    assert any("momentum" in note for note in s.notes)
    s = stability(objective(), 0.1, momentum=0.9, nesterov=True)
    assert s.thresholds == {"gd": pytest.approx(3.8 / 0.28)}  # (2 + 2β)/((1 + 2β)η)


def test_adam_gets_its_threshold_and_no_verdict():
    s = stability(objective(), 1e-3, momentum=0.9, optimizer="adam", batch_size=8)
    assert s.thresholds == {"adam": pytest.approx(3.8 / (0.1 * 1e-3))}
    assert s.verdicts == () and "Adam" in s.notes[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"lr": 0.0}, "lr must be > 0"), ({"lr": 0.1, "optimizer": "lion"}, "optimizer"),
     ({"lr": 0.1, "momentum": 1.0}, "momentum"), ({"lr": 0.1, "nesterov": True}, "nesterov"),
     ({"lr": 0.1, "batch_size": 0}, "batch_size"), ({"lr": 0.1, "max_samples": 1}, "max_samples")],
)  # fmt: skip
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        stability(objective(), **kwargs)


def objective_of(obj, x, y):
    """``obj`` over the samples ``(x, y)`` alone."""
    return obj.with_data([(x, y)])
