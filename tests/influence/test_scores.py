"""influence(): the stated convention against leave-one-out retraining and dense formulas."""

import pytest
import torch
import torch.nn.functional as F
from influence_problems import DT, blobs, fit, mean_loss, trained
from scipy import stats
from torch import nn

from hesse.influence import influence

LAM = 0.1


@pytest.fixture(scope="module")
def problem():
    model, x, y, theta = trained(n=200, lam=LAM)
    xq, yq = blobs(12, seed=5)
    return model, x, y, theta, xq, yq


def dense_scores(theta, x, y, xq, yq, lam, classes=3):
    """``(1/n) g_q^T (H + lam I)^{-1} g_i`` from torch.func on the flat parameters."""
    H = torch.func.hessian(lambda t: mean_loss(t, x, y, classes))(theta)
    H = H + lam * torch.eye(len(theta), dtype=DT)

    def per_sample(xs, ys):
        return torch.stack(
            [
                torch.func.grad(mean_loss)(theta, a[None], b[None], classes)
                for a, b in zip(xs, ys, strict=True)
            ]
        )

    Gq, G = per_sample(xq, yq), per_sample(x, y)
    return Gq @ torch.linalg.solve(H, G.T) / len(y)


@pytest.mark.parametrize("ihvp", ["exact", "cg", "lissa"])
def test_scores_equal_the_dense_formula(problem, ihvp):
    model, x, y, theta, xq, yq = problem
    q = 3 if ihvp == "lissa" else 12  # LiSSA pays its depth per query
    batches = [(x[:128], y[:128]), (x[128:], y[128:])]
    r = influence(model, batches, [(xq[:q], yq[:q])], F.cross_entropy, ihvp=ihvp, damping=LAM)
    want = dense_scores(theta, x, y, xq[:q], yq[:q], LAM)
    tol = 1e-10 if ihvp == "exact" else 1e-5
    assert r.converged and r.scores.shape == (q, 200)
    assert (r.scores - want).norm() <= tol * want.norm()


def test_lissa_settings_come_from_the_measured_spectrum(problem):
    model, x, y, theta, xq, yq = problem
    r = influence(model, [(x, y)], [(xq[:2], yq[:2])], F.cross_entropy, ihvp="lissa", damping=LAM)
    H = torch.func.hessian(lambda t: mean_loss(t, x, y, 3))(theta)
    lam_max = float(torch.linalg.eigvalsh(H)[-1])
    diag = r.inverse
    assert diag.lam_max == pytest.approx(lam_max, rel=1e-3)
    assert lam_max + LAM < diag.scale < 1.2 * (lam_max + LAM)
    assert diag.depth >= 1 and float(diag.residuals.max()) <= 1e-6


def test_scores_predict_leave_one_out_retraining(problem):
    model, x, y, theta, xq, yq = problem
    r = influence(model, [(x, y)], [(xq, yq)], F.cross_entropy, ihvp="cg", damping=LAM)
    before = float(mean_loss(theta, xq, yq, 3))
    removed = torch.arange(0, 200, 5)  # 40 points
    actual = []
    for i in removed:
        w = torch.ones(200, dtype=DT)
        w[i] = 0.0  # its term l_i / n dropped: the stated convention
        actual.append(float(mean_loss(fit(x, y, 3, LAM, w, start=theta), xq, yq, 3)) - before)
    predicted = r.scores.mean(0)[removed]
    actual = torch.tensor(actual, dtype=DT)
    assert stats.pearsonr(predicted, actual)[0] >= 0.95
    assert stats.spearmanr(predicted, actual)[0] >= 0.95
    assert float(predicted @ actual / (actual @ actual)) == pytest.approx(1.0, abs=0.05)


def test_sign_and_top(problem):
    model, x, y, theta, xq, yq = problem
    r = influence(model, [(x, y)], [(x[:3], y[:3])], F.cross_entropy, ihvp="exact", damping=LAM)
    # removing a query's own training point raises that query's loss: it helps
    assert (r.scores.diagonal() > 0).all()
    assert torch.equal(r.top(1, k=200).helpful, torch.argsort(r.scores[1], descending=True))
    top = r.top(None, k=4)
    row = r.scores.mean(0)
    assert torch.equal(top.harmful_scores, torch.sort(row)[0][:4])
    assert top.helpful_scores[0] == row.max()
    with pytest.raises(IndexError, match="out of range"):
        r.top(3)


def test_ggn_of_a_linear_model_is_its_hessian(problem):
    model, x, y, _, xq, yq = problem
    a = influence(model, [(x, y)], [(xq, yq)], F.cross_entropy, ihvp="exact", damping=LAM)
    b = influence(
        model, [(x, y)], [(xq, yq)], F.cross_entropy, ihvp="cg", damping=LAM, curvature="ggn"
    )
    assert (a.scores - b.scores).norm() <= 1e-6 * a.scores.norm()


def test_woodbury_is_the_exact_inverse_of_the_damped_empirical_fisher(problem):
    model, x, y, _, xq, yq = problem
    a = influence(model, [(x, y)], [(xq, yq)], F.cross_entropy, ihvp="woodbury", damping=0.1)
    b = influence(
        model,
        [(x[:77], y[:77]), (x[77:], y[77:])],
        [(xq, yq)],
        F.cross_entropy,
        ihvp="exact",
        damping=0.1,
        curvature="fisher",
    )
    assert a.curvature == "fisher" and a.converged
    assert (a.scores - b.scores).norm() <= 1e-9 * b.scores.norm()
    assert a.memory["gram_and_cholesky"] == 2 * 200 * 200 * 8


def test_losses_gradient_norm_and_memory(problem):
    model, x, y, theta, xq, yq = problem
    r = influence(model, [(x, y)], [(xq, yq)], F.cross_entropy, ihvp="cg", damping=LAM)
    want = F.cross_entropy(model(x), y, reduction="none").detach()
    assert torch.allclose(r.train_losses, want, atol=1e-12)
    # at the regularized minimum the data gradient is -lam * theta
    assert r.gradient_norm == pytest.approx(float(LAM * theta.norm()), rel=1e-6)
    assert r.memory["total"] == sum(v for k, v in r.memory.items() if k != "total")
    assert r.to_dict()["inverse"]["converged"]


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT).eval()


def test_indefinite_hessian_without_damping_names_the_fix():
    x, y = blobs(40)
    model = mlp()  # untrained: its Hessian is indefinite
    for ihvp in ("cg", "exact", "lissa"):
        with pytest.raises(ValueError, match=r"not positive definite.*Pass damping > .*ggn"):
            influence(model, [(x, y)], [(x[:2], y[:2])], F.cross_entropy, ihvp=ihvp)
    r = influence(
        model, [(x, y)], [(x[:2], y[:2])], F.cross_entropy, ihvp="cg", curvature="ggn", damping=1e-3
    )
    assert r.converged and torch.isfinite(r.scores).all()


def test_definite_hessian_without_damping_is_measured_and_solved():
    x, _ = blobs(60)
    t = x.sum(1, keepdim=True) + 0.1 * x[:, :1] ** 2
    model = nn.Linear(3, 1).to(DT).eval()  # least squares: H = 2 [x 1]^T [x 1] / n > 0
    a = influence(model, [(x, t)], [(x[:2], t[:2])], F.mse_loss, ihvp="cg")
    b = influence(model, [(x, t)], [(x[:2], t[:2])], F.mse_loss, ihvp="exact")
    assert a.inverse.lam_min > 0 and a.scores.shape == (2, 60) and a.converged
    assert (a.scores - b.scores).norm() <= 1e-5 * b.scores.norm()


@pytest.mark.parametrize(
    ("kwargs", "query", "match"),
    [
        ({"damping": -1.0}, None, "damping must be >= 0"),
        ({"ihvp": "newton"}, None, "ihvp must be one of"),
        ({"ihvp": "woodbury"}, None, "damping > 0"),
        ({"ihvp": "woodbury", "damping": 1.0, "curvature": "hessian"}, None, "curvature='fisher'"),
        ({"curvature": "kfac"}, None, "curvature must be one of"),
        (
            {"damping": 1.0},
            (torch.zeros(2, 4, dtype=DT), torch.zeros(2, dtype=torch.long)),
            r"query samples have input shape \(4,\)",
        ),
        (
            {"damping": 1.0},
            [{"x": torch.zeros(2, 3, dtype=DT), "labels": torch.zeros(2)}],
            r"query samples have the keys \[.labels., .x.\] \(dict batches\)",
        ),
    ],
)
def test_bad_input_is_refused(kwargs, query, match):
    x, y = blobs(20)
    model = nn.Linear(3, 3).to(DT).eval()
    query = [(x[:2], y[:2])] if query is None else query
    with pytest.raises(ValueError, match=match):
        influence(model, [(x, y)], query, F.cross_entropy, **kwargs)


def test_lissa_measures_an_indefinite_hessian_before_choosing_its_depth():
    x, y = blobs(40)
    model = mlp()  # untrained: smallest Hessian eigenvalue below zero, covered by the damping
    a = influence(model, [(x, y)], [(x[:2], y[:2])], F.cross_entropy, ihvp="cg", damping=2.0)
    b = influence(model, [(x, y)], [(x[:2], y[:2])], F.cross_entropy, ihvp="lissa", damping=2.0)
    assert b.inverse.lam_min < 0 and b.converged
    assert (a.scores - b.scores).norm() <= 1e-5 * a.scores.norm()
