"""landscape(): values against direct evaluation, curvature = λ1, model untouched, batch-norm."""

import copy

import matplotlib
import pytest
import torch
from dynamics_problems import data, dense_hessian, mlp, objective
from torch import nn
from torch.func import functional_call

import hesse
from hesse.dynamics import criteria_from, landscape, spectral_criteria

matplotlib.use("Agg")


def _direct(obj, theta):
    """The mean loss at flat parameters ``theta``, by a plain forward pass per batch."""
    params = obj.space.split(theta)
    total, n = 0.0, 0
    for x, y in obj.batches():
        out = functional_call(obj.model, (params, obj.frozen), (x,))
        total += float(nn.functional.mse_loss(out, y)) * len(x)
        n += len(x)
    return total / n


def test_1d_and_2d_values_equal_direct_evaluation_with_uneven_batches():
    obj = objective(n=25, batch=10)
    theta = obj.space.join(obj.params)
    ls1 = landscape(obj, "filter", span=0.8, steps=5, chunk=3)
    for i in (0, 2, 4):
        want = _direct(obj, theta + ls1.axes[0][i] * ls1.directions[:, 0])
        assert float(ls1.values[i]) == pytest.approx(want, rel=1e-12)
    assert float(ls1.values[2]) == pytest.approx(ls1.center, rel=1e-12)
    ls2 = landscape(obj, "random", span=2.0, steps=5, dims=2, chunk=7)
    a, b = ls2.axes
    U, V = ls2.directions.T
    for i, j in ((0, 4), (3, 1), (2, 2)):
        want = _direct(obj, theta + a[i] * U + b[j] * V)
        assert float(ls2.values[i, j]) == pytest.approx(want, rel=1e-12)
    assert ls2.n_evaluations == 25 and ls2.values.shape == (5, 5)


def test_curvature_along_the_top_eigenvector_is_the_top_eigenvalue():
    obj = objective()
    lam = torch.linalg.eigvalsh(dense_hessian(obj)).flip(0)
    ls = landscape(obj, "hessian", span=1e-3, steps=3, dims=2)
    assert ls.eigenvalues.tolist() == pytest.approx(lam[:2].tolist(), rel=1e-9)
    assert ls.curvature_along(0) == pytest.approx(float(lam[0]), rel=1e-5)
    assert ls.curvature_along(1) == pytest.approx(float(lam[1]), rel=1e-5)
    with pytest.raises(ValueError, match="odd number"):
        landscape(obj, "hessian", span=1e-3, steps=4).curvature_along(0)


def test_filter_directions_match_filter_norms_and_skip_biases():
    model = mlp()
    obj = objective(model)
    d = obj.space.split(landscape(obj, "filter", steps=3).directions[:, 0])
    for name, theta in obj.params.items():
        if theta.dim() == 1:
            assert d[name].abs().max() == 0
        else:
            assert d[name].norm(dim=1).tolist() == pytest.approx(theta.norm(dim=1).tolist())


def test_the_model_is_never_left_modified_even_on_an_exception():
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    obj = objective(model)
    landscape(obj, "filter", span=5.0, steps=7, dims=2)
    calls = {"n": 0}

    def flaky(out, y):
        calls["n"] += 1
        if calls["n"] > 1:  # the second chunk of grid points
            raise RuntimeError("boom")
        return nn.functional.mse_loss(out, y)

    bad = hesse.Objective(model, [data()], flaky)
    with pytest.raises(RuntimeError, match="boom"):
        landscape(bad, "filter", span=5.0, steps=5, chunk=2)
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name
    assert all(p.requires_grad for p in model.parameters())


def test_batch_norm_runs_in_eval_mode_and_train_mode_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = data()
    model.train()
    model(x)  # running statistics that differ from the defaults
    stats = model[1].running_mean.clone()
    with pytest.raises(ValueError, match="batch-norm"):
        landscape(hesse.Objective(model, [(x, y)], nn.functional.mse_loss,
                                  allow_train_mode=True))  # fmt: skip
    model.eval()
    obj = hesse.Objective(model, [(x, y)], nn.functional.mse_loss)
    ls = landscape(obj, "filter", span=0.5, steps=5)
    theta = obj.space.join(obj.params)
    assert float(ls.values[4]) == pytest.approx(_direct(obj, theta + 0.5 * ls.directions[:, 0]))
    assert torch.equal(model[1].running_mean, stats)
    d = obj.space.split(ls.directions[:, 0])
    assert d["1.weight"].abs().max() == 0 and d["1.bias"].abs().max() == 0


def test_given_directions_and_their_errors():
    obj = objective()
    u = torch.zeros(obj.dim, dtype=torch.float64)
    u[0] = 1.0
    ls = landscape(obj, u, span=1e-3, steps=3)
    H = dense_hessian(obj)
    assert ls.kind == "given" and ls.curvature_along(0) == pytest.approx(float(H[0, 0]), rel=1e-5)
    with pytest.raises(ValueError, match="flat vector"):
        landscape(obj, (u, u[:-1]), dims=2)
    with pytest.raises(ValueError, match="directions must be one of"):
        landscape(obj, "pca")
    with pytest.raises(ValueError, match="dims must be 1 or 2"):
        landscape(obj, dims=3)


def test_plots_are_figures():
    obj = objective()
    assert landscape(obj, steps=5).plot().axes[0].get_ylabel() == "loss"
    assert len(landscape(obj, steps=5, dims=2).plot().axes) == 1


def test_spectral_criteria_against_the_dense_spectrum():
    obj = objective()
    lam = torch.linalg.eigvalsh(dense_hessian(obj)).flip(0)
    c = spectral_criteria(obj, k=4, steps=obj.dim, probes=30)
    assert c.ratio == pytest.approx(float(lam[0] / lam[3]), rel=1e-8)
    assert abs(c.trace - float(lam.sum())) <= 4 * c.trace_stderr
    exact = float(lam[lam < 0].abs().sum() / lam.abs().sum())
    assert exact > 0.01  # the small MLP is not at a minimum: some mass is negative
    assert c.negative_share == pytest.approx(exact, abs=0.05)
    assert set(c.definitions) == {"ratio", "negative_share", "trace_ratio"}


def test_criteria_from_existing_results_equal_the_full_computation():
    obj = objective()
    op = hesse.HessianOperator(obj)
    top, dens = hesse.eigs(op, 3), hesse.density(op, steps=20, probes=3)
    got = criteria_from(top.values, dens)
    assert got == spectral_criteria(obj, k=3, steps=20, probes=3)
    assert op.n_matvecs == top.n_matvecs + dens.n_matvecs  # criteria_from adds no product
