"""Contract tests of issue 10 (hesse.prune), written from the issue text.

References are dense and independent: Hessians by ``torch.func``, the empirical Fisher from
per-sample gradients, the layer error ``||(W - W_hat) X||^2`` and magnitude pruning by hand.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

import hesse
from hesse import prune

torch.set_num_threads(1)
DT = torch.float64


def _setup(seed=0, n=24):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT).eval()
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)
    return model, [(x, y)]


def _names(model):
    return [(k, p.shape, p.numel()) for k, p in model.named_parameters()]


def _flat(model, names=None):
    return torch.cat(
        [p.detach().reshape(-1) for k, p in model.named_parameters() if names is None or k in names]
    )


def _dense_hessian(model, data):
    (x, y), shapes = data[0], _names(model)

    def f(theta):
        out, i = {}, 0
        for k, s, m in shapes:
            out[k] = theta[i : i + m].view(s)
            i += m
        return F.cross_entropy(functional_call(model, out, (x,)), y)

    return hessian(f)(_flat(model))


def _per_sample_grads(model, data, names):
    rows = []
    for x, y in data:
        for i in range(len(x)):
            ps = [p for k, p in model.named_parameters() if k in names]
            loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, ps)]))
    return torch.stack(rows)


def _scores_flat(s, model):
    return torch.cat([s.scores[k].reshape(-1).to(DT) for k, *_ in _names(model)])


# ---------------------------------------------------------------- saliencies


def test_obd_equals_half_exact_hessian_diagonal_times_w_squared():
    model, data = _setup()
    obj = hesse.Objective(model, data, F.cross_entropy)
    s = prune.saliency(obj, "obd", curvature="hessian", budget=None, damping=1e-12)
    H = _dense_hessian(model, data)
    w = _flat(model)
    want = 0.5 * H.diag() * w**2
    got = _scores_flat(s, model)
    assert torch.allclose(got, want, rtol=1e-8, atol=1e-10 * want.abs().max()), got - want


def test_default_curvature_is_psd_with_damping_relative_to_its_mean_diagonal():
    model, data = _setup()
    obj = hesse.Objective(model, data, F.cross_entropy)
    s = prune.saliency(obj, "obs", m=None, damping=0.05)
    assert s.curvature == "fisher"
    names = {k for k, *_ in _names(model)}
    G = _per_sample_grads(model, data, names)
    mean_diag = (G**2).mean(0).mean().item()
    assert s.relative_damping >= 0.05 - 1e-12
    assert abs(s.damping - s.relative_damping * mean_diag) <= 1e-8 * s.damping
    # OBS saliency w^2 / (2 [F^-1]_qq) with F = lam I + G^T G / m.
    Fm = s.damping * torch.eye(G.shape[1], dtype=DT) + G.T @ G / G.shape[0]
    want = _flat(model) ** 2 / (2 * torch.linalg.inv(Fm).diag())
    got = _scores_flat(s, model)
    assert torch.allclose(got, want, rtol=1e-7), (got - want).abs().max()


def test_obs_with_an_indefinite_hessian_raises_the_damping_itself():
    model, data = _setup(1)
    H = _dense_hessian(model, data)
    assert torch.linalg.eigvalsh(H).min() < -1e-4  # a network away from its minimum
    obj = hesse.Objective(model, data, F.cross_entropy)
    s = prune.saliency(obj, "obs", curvature="hessian", damping=1e-6)
    got = _scores_flat(s, model)
    assert torch.isfinite(got).all() and (got >= 0).all()
    assert torch.linalg.eigvalsh(H + s.damping * torch.eye(len(H), dtype=DT)).min() > 0


def test_obs_single_weight_update_realizes_the_predicted_saliency():
    """One weight removed: 1/2 dw^T F dw of the OBS update equals w_q^2 / (2 [F^-1]_qq)."""
    model, data = _setup(2)
    weights = ["0.weight", "2.weight"]
    obj = hesse.Objective(model, data, F.cross_entropy)
    plan = prune.prune(
        obj, sparsity=1.2 / 24, method="obs", curvature="fisher", m=None, damping=0.01
    )
    assert plan.removed_params == 1, plan.removed_params
    assert sorted(plan.weights) == weights
    w = _flat(model, weights)
    new = torch.cat([plan.weights[k].reshape(-1).to(DT) for k in weights])
    mask = torch.cat([plan.masks[k].reshape(-1) for k in weights])
    q = int((~mask).nonzero())
    assert new[q] == 0.0
    G = _per_sample_grads(model, data, set(weights))
    Fm = plan.damping[0] * torch.eye(len(w), dtype=DT) + G.T @ G / G.shape[0]
    dw = new - w
    predicted = w[q] ** 2 / (2 * torch.linalg.inv(Fm)[q, q])
    assert abs(0.5 * dw @ Fm @ dw - predicted) <= 1e-8 * predicted
    assert abs(plan.predicted[0] - predicted.item()) <= 1e-8 * predicted.item()


# ---------------------------------------------------------------- layer-wise OBS


def _layer(seed, out=8, d=16, n=96):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=DT) * 0.6 + torch.eye(d, dtype=DT)
    X = mix @ torch.randn(d, n, generator=g, dtype=DT)  # correlated inputs
    W = torch.randn(out, d, generator=g, dtype=DT)
    return W, X, 2 * X @ X.T / n


def _magnitude(W, sparsity=None, pattern=False):
    if pattern:
        groups = W.abs().view(W.shape[0], -1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(2, groups.topk(2, dim=2).indices, True)
        return W * keep.view_as(W)
    k = int(round(sparsity * W.numel()))
    cut = W.abs().reshape(-1).kthvalue(k).values
    return W * (W.abs() > cut)


def _err(W, W_hat, X):
    return ((W - W_hat) @ X).pow(2).sum().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_obs_layer_beats_magnitude_unstructured(seed):
    W, X, H = _layer(seed)
    r = prune.obs_layer(W, H, sparsity=0.5)
    assert int((r.weight == 0).sum()) == W.numel() // 2
    assert torch.equal(r.mask, r.weight != 0) or int((~r.mask).sum()) == W.numel() // 2
    e_obs, e_mag = _err(W, r.weight, X), _err(W, _magnitude(W, 0.5), X)
    assert e_obs <= e_mag, (e_obs, e_mag)
    # documented: error = tr((W - W_hat) H (W - W_hat)^T) = 2 ||(W - W_hat) X||^2 / n
    assert abs(r.error - 2 * e_obs / X.shape[1]) <= 1e-8 * r.error


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_obs_layer_2_4_pattern_and_error(seed):
    W, X, H = _layer(seed)
    r = prune.obs_layer(W, H, sparsity=0.5, pattern="2:4", block=128, damping=0.01)  # issue
    nonzero = (r.weight != 0).view(W.shape[0], -1, 4).sum(2)
    assert (nonzero <= 2).all()
    assert (r.mask.view(W.shape[0], -1, 4).sum(2) <= 2).all()
    e_obs, e_mag = _err(W, r.weight, X), _err(W, _magnitude(W, pattern=True), X)
    assert e_obs <= e_mag, (e_obs, e_mag)


def test_obs_layer_never_fails_a_cholesky():
    W, X, _ = _layer(3, n=5)  # rank 5 < 16 inputs: H singular
    X[4] = 0.0  # one input always zero
    H = 2 * X @ X.T / X.shape[1]
    r = prune.obs_layer(W, H, sparsity=0.5, damping=1e-14)
    assert torch.isfinite(r.weight).all()
    assert r.damping > 0 and r.relative_damping >= 1e-14
    assert (r.weight[:, 4] == 0).all(), "an input that is always zero is pruned first"


# ---------------------------------------------------------------- the plan


def _setup_4(seed=0, n=24):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT).eval()
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)
    return model, [(x, y)]


@pytest.mark.parametrize("method", ["magnitude", "obd", "obs", "mfac", "layer_obs"])
def test_plan_2_4_keeps_at_most_two_of_every_four(method):
    model, data = _setup_4(4)
    obj = hesse.Objective(model, data, F.cross_entropy)
    plan = prune.prune(obj, method=method, structure="2:4", m=None)
    pruned = dict(plan.apply(model).named_parameters())
    assert sorted(plan.masks) == ["0.weight", "2.weight"]
    for k in plan.masks:
        w = pruned[k]
        assert ((w != 0).view(w.shape[0], -1, 4).sum(2) <= 2).all(), k
        assert int((w == 0).sum()) >= w.numel() // 2, k


def test_explicit_weight_whose_rows_a_pattern_does_not_divide_is_an_error():
    model, data = _setup(0)  # 0.weight is (4, 3): rows of 3
    obj = hesse.Objective(model, data, F.cross_entropy)
    with pytest.raises(ValueError):
        prune.prune(obj, method="magnitude", structure="2:4", params=["0.weight"], m=None)


@pytest.mark.parametrize("method", ["magnitude", "obd", "obs", "mfac"])
def test_plan_apply_returns_a_pruned_copy_and_leaves_the_model_untouched(method):
    model, data = _setup(3)
    before = copy.deepcopy(model.state_dict())
    obj = hesse.Objective(model, data, F.cross_entropy)
    # m=None: one gradient per sample (the default m=256 is more than these 24 samples)
    plan = prune.prune(obj, sparsity=0.5, method=method, m=None)
    pruned = plan.apply(model)
    assert pruned is not model
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} of the original changed"
    weights = dict(pruned.named_parameters())
    total = sum(weights[k].numel() for k in plan.masks)
    zeros = sum(int((weights[k] == 0).sum()) for k in plan.masks)
    assert zeros == round(0.5 * total) == plan.removed_params
    for k, m in plan.masks.items():
        assert (weights[k][~m] == 0).all()


def test_sparsity_zero_prunes_nothing():
    model, data = _setup(3)
    plan = prune.prune(
        hesse.Objective(model, data, F.cross_entropy), sparsity=0.0, method="magnitude"
    )
    pruned = plan.apply(model)
    assert plan.removed_params == 0
    for (k, a), b in zip(pruned.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_sparsity_outside_unit_interval_is_an_error(sparsity):
    model, data = _setup()
    obj = hesse.Objective(model, data, F.cross_entropy)
    with pytest.raises(ValueError, match="(?i)sparsity"):
        prune.prune(obj, sparsity=sparsity, method="magnitude")
    W, _, H = _layer(0)
    with pytest.raises(ValueError, match="(?i)sparsity"):
        prune.obs_layer(W, H, sparsity=sparsity)


def test_pattern_that_does_not_divide_the_row_is_an_error():
    W, _, H = _layer(0, d=6)
    with pytest.raises(ValueError):
        prune.obs_layer(W, H, sparsity=None, pattern="2:4")


def test_m_larger_than_the_data_is_an_error():
    model, data = _setup(n=10)
    with pytest.raises(ValueError):
        prune.collect_gradients(hesse.Objective(model, data, F.cross_entropy), m=11)


def test_module_with_no_inputs_recorded_is_an_error():
    model, data = _setup()
    unused = nn.Linear(3, 3).to(DT)
    with pytest.raises(ValueError):
        prune.layer_hessian(model, unused, data)


# ---------------------------------------------------------------- pieces


def test_group_saliency_is_the_nvit_formula():
    """(1/m) sum_i (sum_{q in S} w_q g_iq)^2 per hidden neuron, per-sample gradients."""
    model, data = _setup_4(5)
    units = [
        prune.Unit(
            "channels", "", j, (("0.weight", 0, (j,)), ("0.bias", 0, (j,)), ("2.weight", 1, (j,)))
        )
        for j in range(8)
    ]
    gs = prune.group_saliency(hesse.Objective(model, data, F.cross_entropy), units, m=None)
    names = [k for k, *_ in _names(model)]
    G = _per_sample_grads(model, data, set(names))
    shapes = {k: p.shape for k, p in model.named_parameters()}
    offsets, i = {}, 0
    for k in names:
        offsets[k] = i
        i += shapes[k].numel()
    w = _flat(model)
    for j in range(8):
        idx = torch.zeros(len(w), dtype=torch.bool)
        for k, dim in (("0.weight", 0), ("0.bias", 0), ("2.weight", 1)):
            sel = torch.zeros(shapes[k], dtype=torch.bool)
            sel.select(dim, j).fill_(True)
            idx[offsets[k] : offsets[k] + sel.numel()] = sel.reshape(-1)
        want = ((G[:, idx] @ w[idx]) ** 2).mean()
        assert abs(gs.scores[j].item() - want.item()) <= 1e-10 * want.item(), j


def test_woodbury_fisher_matches_dense_with_updates_and_a_window():
    g = torch.Generator().manual_seed(0)
    d, m, lam = 1000, 32, 1e-3
    G = torch.randn(m + 3, d, generator=g, dtype=DT)
    Fw = hesse.WoodburyFisher(G[:m], damping=lam, window=m)
    for j in range(m, m + 3):
        Fw.update(G[j])  # the window slides: rows 3 .. m + 2 remain
    W = G[3:]
    dense = lam * torch.eye(d, dtype=DT) + W.T @ W / m
    v = torch.randn(d, generator=g, dtype=DT)
    assert Fw.m == m
    inv = torch.linalg.inv(dense)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(Fw @ v, dense @ v) < 1e-8
    assert rel(Fw.inverse() @ v, inv @ v) < 1e-8
    assert rel(Fw.diag(), dense.diag()) < 1e-10
    assert rel(Fw.inverse_diag(), inv.diag()) < 1e-8


@pytest.mark.parametrize("recompute", [1, 3])
def test_plan_layer_scope_gives_every_tensor_the_sparsity(recompute):
    model, data = _setup_4(6)
    obj = hesse.Objective(model, data, F.cross_entropy)
    plan = prune.prune(obj, sparsity=0.5, method="mfac", scope="layer", recompute=recompute, m=None)
    pruned = dict(plan.apply(model).named_parameters())
    for k in plan.masks:
        assert int((pruned[k] == 0).sum()) == pruned[k].numel() // 2, k
    assert len(plan.damping) == recompute and all(dmp > 0 for dmp in plan.damping)
