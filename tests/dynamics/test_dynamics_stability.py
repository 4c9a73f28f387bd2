"""stability(): thresholds per optimizer, verdicts from hesse.analysis against dense values."""

import pytest
import torch
from dynamics_problems import dense_hessian, objective

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


def test_sgd_minibatches_add_the_trace_criterion_with_its_interval():
    obj = objective(batch=8)
    exact = float(torch.trace(dense_hessian(obj)))
    s = stability(obj, 0.05, batch_size=8, budget=90)
    assert set(s.thresholds) == {"gd", "sgd_trace"}
    sgd = s.verdicts[1]
    assert sgd.quantity == "trace" and sgd.threshold == pytest.approx(40.0)
    lo, hi = s.trace.ci95
    assert lo - 1e-9 <= exact <= hi + 1e-9  # Hutch++ interval (seeded)


def test_momentum_raises_the_gd_threshold_and_drops_the_trace_criterion():
    s = stability(objective(), 0.1, momentum=0.9, batch_size=8)
    assert s.thresholds == {"gd": pytest.approx(38.0)}
    assert s.verdicts[0].threshold == pytest.approx(38.0)
    assert any("momentum" in note for note in s.notes)


def test_adam_gets_its_threshold_and_no_verdict():
    s = stability(objective(), 1e-3, momentum=0.9, optimizer="adam", batch_size=8)
    assert s.thresholds == {"adam": pytest.approx(3.8 / (0.1 * 1e-3))}
    assert s.verdicts == () and "Adam" in s.notes[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"lr": 0.0}, "lr must be > 0"), ({"lr": 0.1, "optimizer": "lion"}, "optimizer"),
     ({"lr": 0.1, "momentum": 1.0}, "momentum")],
)  # fmt: skip
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        stability(objective(), **kwargs)
