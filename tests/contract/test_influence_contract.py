"""Contract tests of issue 13 (influence, unlearn, hypergradient), written from the issue text.

The reference is retraining: L2-regularized logistic regression (softmax over two classes,
float64) trained to its optimum by Newton's method with ``torch.func`` derivatives, then
retrained without each point (leave-one-out), without a forget set, or at a perturbed weight
decay (finite differences).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev

import hesse

torch.set_num_threads(1)
DT = torch.float64
LAM = 0.2  # weight decay of the training objective


def _api(name):
    """The issue's ``hesse.<name>``, falling back to ``hesse.influence.<name>``."""
    obj = getattr(hesse, name, None)
    if callable(obj):
        return obj
    from hesse import influence as package

    return getattr(package, name)


def _problem(n=40, n_query=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_true = torch.tensor([1.5, -2.0, 0.7], dtype=DT)
    x = torch.randn(n + n_query, 3, generator=g, dtype=DT)
    p = torch.sigmoid(x @ w_true + 0.3)
    y = (torch.rand(n + n_query, generator=g, dtype=DT) < p).long()
    return (x[:n], y[:n]), (x[n:], y[n:])


def _model():
    torch.manual_seed(0)
    return nn.Linear(3, 2).to(DT).eval()


def _unflat(model, theta):
    return {"weight": theta[:6].view(2, 3), "bias": theta[6:8]}


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _set(model, theta):
    with torch.no_grad():
        for p, v in zip(model.parameters(), _unflat(model, theta).values(), strict=True):
            p.copy_(v)
    return model


def _losses(model, theta, x, y):
    return F.cross_entropy(functional_call(model, _unflat(model, theta), (x,)), y, reduction="none")


def _train(model, x, y, weights=None, decay=LAM, n=None, theta=None):
    """Minimize (1/n) sum_i weights_i l_i + 1/2 sum_j decay_j theta_j^2 by Newton's method."""
    weights = torch.ones(len(x), dtype=DT) if weights is None else weights
    n = len(x) if n is None else n
    decay = torch.as_tensor(decay, dtype=DT).expand(8)

    def objective(t):
        return (weights * _losses(model, t, x, y)).sum() / n + 0.5 * (decay * t**2).sum()

    theta = torch.zeros(8, dtype=DT) if theta is None else theta.clone()
    for _ in range(50):
        g = grad(objective)(theta)
        if g.norm() < 1e-13:
            break
        theta = theta - torch.linalg.solve(hessian(objective)(theta), g)
    assert grad(objective)(theta).norm() < 1e-12
    return theta


def _query_loss(model, theta, xq, yq):
    return _losses(model, theta, xq, yq)


@pytest.fixture(scope="module")
def loo():
    """The trained model and the actual change of each query loss without each point."""
    (x, y), (xq, yq) = _problem()
    model = _model()
    n = len(x)
    theta = _train(model, x, y)
    base = _query_loss(model, theta, xq, yq)
    actual = torch.empty(len(xq), n, dtype=DT)
    for i in range(n):
        w = torch.ones(n, dtype=DT)
        w[i] = 0.0
        # The documented convention: the term l_i / n is dropped, the rest kept as it is.
        t_i = _train(model, x, y, weights=w, n=n, theta=theta)
        actual[:, i] = _query_loss(model, t_i, xq, yq) - base
    return _set(model, theta), (x, y), (xq, yq), actual


def _pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


@pytest.mark.parametrize("ihvp,min_corr", [("exact", 0.99), ("cg", 0.99), ("lissa", 0.95)])
def test_scores_predict_leave_one_out_retraining(loo, ihvp, min_corr):
    model, train, query, actual = loo
    inf = _api("influence")(model, [train], [query], F.cross_entropy, ihvp=ihvp, damping=LAM)
    assert inf.scores.shape == actual.shape
    for q in range(actual.shape[0]):
        pred, act = inf.scores[q].to(DT), actual[q]
        corr = _pearson(pred, act)
        slope = (pred @ act / (pred @ pred)).item()  # least squares act ~ slope * pred
        assert corr >= min_corr, f"query {q}: Pearson {corr:.4f}"
        # Sign and 1/n scale: a factor n or a flipped sign is far outside this band. (The
        # first-order prediction falls 4-12% short of retraining here; the exact formula is
        # checked in test_scores_equal_the_documented_formula.)
        assert 0.8 <= slope <= 1.25, f"query {q}: actual / predicted slope {slope:.4f}"
        big = act.abs() > 0.1 * act.abs().max()
        assert torch.equal(torch.sign(pred[big]), torch.sign(act[big])), f"query {q}: signs"


@pytest.mark.parametrize("ihvp,rtol", [("exact", 1e-10), ("cg", 1e-5)])
def test_scores_equal_the_documented_formula(loo, ihvp, rtol):
    """scores[q, i] = (1/n) grad L_q^T (H + lam I)^-1 grad l_i, dense in float64."""
    model, (x, y), (xq, yq), _ = loo
    theta, n = _flat(model), len(x)

    def objective(t):
        return _losses(model, t, x, y).mean() + 0.5 * LAM * (t**2).sum()

    G = jacrev(lambda t: _losses(model, t, x, y))(theta)
    Gq = jacrev(lambda t: _losses(model, t, xq, yq))(theta)
    want = Gq @ torch.linalg.solve(hessian(objective)(theta), G.T) / n
    inf = _api("influence")(model, [(x, y)], [(xq, yq)], F.cross_entropy, ihvp=ihvp, damping=LAM)
    err = (inf.scores.to(DT) - want).abs().max().item()
    assert err <= rtol * want.abs().max().item(), err


@pytest.mark.parametrize("ihvp,curvature", [("woodbury", "fisher"), ("exact", "ggn")])
def test_scores_with_other_curvatures_equal_their_formula(loo, ihvp, curvature):
    """Woodbury: the damped empirical Fisher of the per-sample gradients; GGN = H here."""
    model, (x, y), (xq, yq), _ = loo
    theta, n = _flat(model), len(x)
    G = jacrev(lambda t: _losses(model, t, x, y))(theta)
    Gq = jacrev(lambda t: _losses(model, t, xq, yq))(theta)
    if curvature == "fisher":
        A = G.T @ G / n
    else:  # a linear model: the GGN of the mean loss is its Hessian
        A = hessian(lambda t: _losses(model, t, x, y).mean())(theta)
    want = Gq @ torch.linalg.solve(A + LAM * torch.eye(8, dtype=DT), G.T) / n
    inf = _api("influence")(
        model, [(x, y)], [(xq, yq)], F.cross_entropy, ihvp=ihvp, damping=LAM, curvature=curvature
    )
    err = (inf.scores.to(DT) - want).abs().max().item()
    assert err <= 1e-9 * want.abs().max().item(), err


def _ill_conditioned(lam=1e-3):
    (x, y), (xq, yq) = _problem()
    model = _model()
    theta = _train(model, x, y, decay=lam)
    G = jacrev(lambda t: _losses(model, t, x, y))(theta)
    Gq = jacrev(lambda t: _losses(model, t, xq, yq))(theta)
    H = hessian(lambda t: _losses(model, t, x, y).mean())(theta) + lam * torch.eye(8, dtype=DT)
    return _set(model, theta), (x, y), (xq, yq), Gq @ torch.linalg.solve(H, G.T) / len(x)


def test_lissa_needs_no_hand_tuning_on_an_ill_conditioned_hessian():
    lam = 1e-3  # condition number about 300
    model, train, query, want = _ill_conditioned(lam)
    inf = _api("influence")(model, [train], [query], F.cross_entropy, ihvp="lissa", damping=lam)
    assert torch.isfinite(inf.scores).all()
    assert inf.converged
    err = (inf.scores.to(DT) - want).abs().max().item()
    assert err <= 1e-4 * want.abs().max().item(), err


@pytest.mark.parametrize("ihvp", ["cg", "lissa"])
def test_an_inverse_stopped_early_says_so(ihvp):
    model, train, query, _ = _ill_conditioned(1e-2)
    inf = _api("influence")(
        model, [train], [query], F.cross_entropy, ihvp=ihvp, damping=1e-2, max_matvecs=2
    )
    assert not inf.converged
    assert inf.inverse.residuals.max().item() > inf.inverse.tol


def test_top_returns_the_extreme_scores(loo):
    model, train, query, _ = loo
    inf = _api("influence")(model, [train], [query], F.cross_entropy, ihvp="exact", damping=LAM)
    top = inf.top(1, k=3)
    order = torch.argsort(inf.scores[1], descending=True)
    assert top.helpful.tolist() == order[:3].tolist()
    assert top.harmful.tolist() == order.flip(0)[:3].tolist()


def test_negative_damping_is_an_error(loo):
    model, train, query, _ = loo
    with pytest.raises(ValueError, match="(?i)damping"):
        _api("influence")(model, [train], [query], F.cross_entropy, ihvp="cg", damping=-0.1)


def test_query_with_a_different_shape_is_an_error(loo):
    model, train, (xq, yq), _ = loo
    wrong = (torch.randn(len(xq), 4, dtype=DT), yq)
    with pytest.raises(ValueError):
        _api("influence")(model, [train], [wrong], F.cross_entropy, ihvp="exact", damping=LAM)


def test_cg_on_an_indefinite_hessian_without_damping_names_the_fix():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).to(DT).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 2, generator=g, dtype=DT), torch.randn(20, 1, generator=g, dtype=DT)
    params = {k: v.detach() for k, v in model.named_parameters()}
    shapes = [(k, v.shape, v.numel()) for k, v in params.items()]

    def f(t):
        out, i = {}, 0
        for k, s, m in shapes:
            out[k] = t[i : i + m].view(s)
            i += m
        return F.mse_loss(functional_call(model, out, (x,)), y)

    theta = torch.cat([v.reshape(-1) for v in params.values()])
    assert torch.linalg.eigvalsh(hessian(f)(theta)).min() < -1e-3  # really indefinite
    with pytest.raises(ValueError, match="(?i)damping"):
        _api("influence")(model, [(x, y)], [(x[:2], y[:2])], F.mse_loss, ihvp="cg", damping=0.0)


# ---------------------------------------------------------------- unlearning


def _split_forget(train, k=4):
    x, y = train
    return (x[:k], y[:k]), (x[k:], y[k:])


@pytest.mark.parametrize("method", ["newton", "iau"])
def test_unlearn_returns_a_new_model_and_leaves_the_original_untouched(loo, method):
    model, train, _, _ = loo
    forget, remain = _split_forget(train)
    before = copy.deepcopy(model.state_dict())
    res = _api("unlearn")(
        model, [forget], [remain], F.cross_entropy, method=method, weight_decay=LAM
    )
    new = res.model if hasattr(res, "model") else res
    assert new is not model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"the original's {k} changed"
    assert not torch.equal(_flat(new), _flat(model)), "unlearning did not move the weights"
    if hasattr(res, "delta"):
        assert torch.allclose(_flat(new) - _flat(model), res.delta.to(DT), atol=1e-12)


def test_newton_unlearning_lands_near_the_retrained_model(loo):
    model, train, _, _ = loo
    forget, remain = _split_forget(train)
    retrained = _train(model, *remain, theta=_flat(model))
    res = _api("unlearn")(
        model, [forget], [remain], F.cross_entropy, method="newton", weight_decay=LAM, ihvp="exact"
    )
    far = (_flat(model) - retrained).norm().item()
    near = (_flat(res.model) - retrained).norm().item()
    assert near < 0.05 * far, f"distance to retrained {near:.3e} vs {far:.3e} before"


def test_iau_default_step_minimizes_the_quadratic_model_along_its_direction(loo):
    model, train, _, _ = loo
    forget, remain = _split_forget(train)
    theta = _flat(model)

    def mean_loss(t, data):
        return _losses(model, t, *data).mean()

    def remaining(t):
        return mean_loss(t, remain) + 0.5 * LAM * (t**2).sum()

    d = grad(mean_loss)(theta, remain) - grad(mean_loss)(theta, forget)
    t_star = (grad(remaining)(theta) @ d) / (d @ hessian(remaining)(theta) @ d)
    res = _api("unlearn")(
        model, [forget], [remain], F.cross_entropy, method="iau", weight_decay=LAM
    )
    assert torch.allclose(_flat(res.model) - theta, -t_star * d, rtol=1e-8, atol=1e-12)
    assert remaining(_flat(res.model)) < remaining(theta)


def test_iau_with_a_learning_rate_steps_eta_nf_over_n(loo):
    model, train, _, _ = loo
    forget, remain = _split_forget(train)
    theta, eta = _flat(model), 0.3

    def mean_loss(t, data):
        return _losses(model, t, *data).mean()

    d = grad(mean_loss)(theta, remain) - grad(mean_loss)(theta, forget)
    res = _api("unlearn")(
        model, [forget], [remain], F.cross_entropy, method="iau", weight_decay=LAM, lr=eta
    )
    t = eta * len(forget[0]) / len(train[0])
    assert torch.allclose(_flat(res.model) - theta, -t * d, rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------- hypergradients


def _outer_at(decay, model, train, val, theta0):
    t = _train(model, *train, decay=decay, theta=theta0)
    return _losses(model, t, *val).mean().item()


@pytest.mark.parametrize("ihvp", ["exact", "cg"])
def test_hypergradient_of_weight_decay_equals_finite_differences(loo, ihvp):
    model, train, val, _ = loo
    m = copy.deepcopy(model)
    h, eps = 0.08, 1e-4
    theta = _train(m, *train, decay=h, theta=_flat(model))
    _set(m, theta)
    inner = hesse.Objective(m, [train], F.cross_entropy)
    outer = hesse.Objective(m, [val], F.cross_entropy)
    r = _api("hypergradient")(inner, outer, torch.tensor(h, dtype=DT), ihvp=ihvp)
    fd = (_outer_at(h + eps, m, train, val, theta) - _outer_at(h - eps, m, train, val, theta)) / (
        2 * eps
    )
    assert abs(r.value.item() - fd) <= 1e-6 * abs(fd) + 1e-10, (r.value.item(), fd)


def test_hypergradient_per_parameter_decays_equal_finite_differences(loo):
    model, train, val, _ = loo
    m = copy.deepcopy(model)
    c, eps = torch.tensor([0.08, 0.02], dtype=DT), 1e-4
    per_coord = torch.cat([c[0].expand(6), c[1].expand(2)])
    theta = _train(m, *train, decay=per_coord, theta=_flat(model))
    _set(m, theta)
    inner = hesse.Objective(m, [train], F.cross_entropy)
    outer = hesse.Objective(m, [val], F.cross_entropy)
    r = _api("hypergradient")(inner, outer, c, ihvp="exact")
    assert r.value.shape == c.shape
    for j, sl in enumerate([slice(0, 6), slice(6, 8)]):
        up, down = per_coord.clone(), per_coord.clone()
        up[sl] += eps
        down[sl] -= eps
        fd = (_outer_at(up, m, train, val, theta) - _outer_at(down, m, train, val, theta)) / (
            2 * eps
        )
        assert abs(r.value[j].item() - fd) <= 1e-6 * abs(fd) + 1e-10, (j, r.value[j].item(), fd)


def test_public_names_of_the_issue():
    for name in ("influence", "unlearn", "hypergradient"):
        assert callable(getattr(hesse, name, None)), f"hesse.{name} is not a public function"


def test_uneven_batches_and_a_dataloader_give_the_same_scores(loo):
    model, (x, y), (xq, yq), _ = loo
    before = copy.deepcopy(model.state_dict())
    one = _api("influence")(model, [(x, y)], [(xq, yq)], F.cross_entropy, ihvp="exact", damping=LAM)
    uneven = [(x[:13], y[:13]), (x[13:], y[13:])]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xq, yq), batch_size=2)
    two = _api("influence")(model, uneven, loader, F.cross_entropy, ihvp="exact", damping=LAM)
    assert torch.allclose(one.scores, two.scores, rtol=1e-10, atol=1e-14)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_params_subset_uses_the_block_of_the_hessian(loo):
    model, (x, y), (xq, yq), _ = loo
    theta, n = _flat(model), len(x)
    G = jacrev(lambda t: _losses(model, t, x, y))(theta)[:, :6]
    Gq = jacrev(lambda t: _losses(model, t, xq, yq))(theta)[:, :6]
    H = hessian(lambda t: _losses(model, t, x, y).mean())(theta)[:6, :6]
    want = Gq @ torch.linalg.solve(H + LAM * torch.eye(6, dtype=DT), G.T) / n
    inf = _api("influence")(
        model, [(x, y)], [(xq, yq)], F.cross_entropy, ihvp="cg", damping=LAM, params=["weight"]
    )
    err = (inf.scores.to(DT) - want).abs().max().item()
    assert err <= 1e-8 * want.abs().max().item(), err
