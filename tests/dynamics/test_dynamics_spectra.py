"""batch_spectrum(): each draw's λmax against a dense reference, the full value, the summary."""

import math

import pytest
import torch
from dynamics_problems import dense_hessian, objective

import hesse
from hesse.dynamics import batch_spectrum


def test_draws_and_full_value_match_dense_hessians_of_the_same_batches():
    obj = objective(n=24, batch=10)
    spec = batch_spectrum(obj, (3, 12, "full"), samples=4, seed=5, tol=1e-10)
    full = float(torch.linalg.eigvalsh(dense_hessian(obj)).max())
    assert spec.full == pytest.approx(full, rel=1e-8)
    assert spec.batch_sizes == (3, 12, 24) and spec.n_samples == 24
    assert spec.values[2] == pytest.approx((full,), rel=1e-8)
    # redraw the same batches: one generator, sizes in order, sorted indices
    gen = torch.Generator().manual_seed(5)
    x, y = (torch.cat(t) for t in zip(*obj.batches(), strict=True))
    for B, row in zip((3, 12), spec.values[:2], strict=True):
        for value in row:
            index = torch.randperm(24, generator=gen)[:B].sort().values
            sub = hesse.Objective(obj.model, [(x[index], y[index])], obj.loss)
            want = float(torch.linalg.eigvalsh(dense_hessian(sub)).max())
            assert value == pytest.approx(want, rel=1e-8)


def test_small_batches_are_sharper_on_average_and_the_summary_adds_up():
    obj = objective(n=48)
    spec = batch_spectrum(obj, (2, 4, 16), samples=6)
    assert spec.mean[0] > spec.mean[2] > 0.0 and spec.mean[0] > spec.full
    for row, m, s, e in zip(spec.values, spec.mean, spec.std, spec.stderr, strict=True):
        t = torch.tensor(row, dtype=torch.float64)
        assert m == pytest.approx(float(t.mean())) and s == pytest.approx(float(t.std()))
        assert e == pytest.approx(s / math.sqrt(len(row)))
    assert spec.max_lr == pytest.approx(tuple(2 / m for m in spec.mean))
    sizes = zip((2, 4, 16), spec.max_lr, strict=True)
    logs = torch.tensor([[math.log(B), math.log(lr)] for B, lr in sizes])
    slope = torch.linalg.lstsq(torch.stack([logs[:, 0], torch.ones(3)], 1), logs[:, 1:]).solution
    assert spec.lr_exponent == pytest.approx(float(slope[0]), rel=1e-5)
    assert len(spec.rows()) == 3 and spec.rows()[0][-1] == pytest.approx(spec.mean[0] / spec.full)


def test_sizes_out_of_range_are_refused():
    with pytest.raises(ValueError, match="sizes must lie in 1..24"):
        batch_spectrum(objective(), (0, 8))
    with pytest.raises(ValueError, match="samples >= 1"):
        batch_spectrum(objective(), (8,), samples=0)
