"""Contract tests of issue 11 (hesse.optim, hesse.regularize), written from the issue text.

Every reference here is computed independently: dense Hessians by ``torch.func``, steps by the
formulas the issue and the papers state, gradients by central finite differences.
"""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

from hesse import optim, regularize

torch.set_num_threads(1)
DT = torch.float64


def _mlp(seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4, bias=bias), nn.Tanh(), nn.Linear(4, 2, bias=bias)).to(DT)


def _data(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 2, (n,), generator=g)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _unflat(model, theta):
    out, i = {}, 0
    for name, p in model.named_parameters():
        out[name] = theta[i : i + p.numel()].view_as(p)
        i += p.numel()
    return out


def _dense_hessian(model, x, y):
    def f(theta):
        return F.cross_entropy(functional_call(model, _unflat(model, theta), (x,)), y)

    return hessian(f)(_flat(model))


def _z(diff, se):
    return (diff.abs() / se.clamp_min(1e-12)).max().item()


# ---------------------------------------------------------------- Hessian-diagonal estimates


def test_rademacher_takes_both_signs_with_probability_half():
    gen = torch.Generator().manual_seed(0)
    z = optim.rademacher(torch.empty(20000, dtype=DT), gen)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 5 / math.sqrt(20000)  # 5 standard errors


def test_hutchinson_diagonal_is_unbiased_over_seeds():
    model, (x, y) = _mlp(), _data()
    H = _dense_hessian(model, x, y)
    params = list(model.parameters())
    est, n = optim.Hutchinson(probes=1), 600
    samples = []
    for seed in range(n):
        gen = torch.Generator().manual_seed(seed)
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        probes = est.draw(params, gen)
        total = est.contribution(probes, params, grads, None, gen)
        d = est.finish(total, x.shape[0])
        samples.append(torch.cat([t.detach().reshape(-1) for t in d]))
    S = torch.stack(samples)
    # Var[z_i (Hz)_i] = sum_{j != i} H_ij^2 for Rademacher z.
    se = ((H**2).sum(1) - H.diag() ** 2).sqrt() / math.sqrt(n)
    assert _z(S.mean(0) - H.diag(), se) < 5
    # The probe bug (every z = -1) would return the row sums, deterministically.
    assert S.std(0).max() > 1e-3


def test_adahessian_first_step_second_moment_is_the_squared_hutchinson_diagonal():
    """First step: |dtheta| = lr |g| / (|D| + eps), so E[D^2] = (H^2)_ii over seeds."""
    model0, (x, y) = _mlp(bias=False), _data()
    H = _dense_hessian(model0, x, y)
    lr, eps, n = 0.1, 1e-4, 300
    loss = F.cross_entropy(model0(x), y)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model0.parameters()))])
    d2 = []
    for seed in range(n):
        model = copy.deepcopy(model0)
        opt = optim.AdaHessian(model.parameters(), lr=lr, eps=eps, seed=seed)
        before = _flat(model)
        opt.step(lambda m=model: F.cross_entropy(m(x), y))
        step = (_flat(model) - before).abs()
        d2.append((lr * g.abs() / step - eps) ** 2)
    D2 = torch.stack(d2)
    se = D2.std(0) / math.sqrt(n)
    assert _z(D2.mean(0) - (H @ H).diag(), se) < 5


def test_spatial_average_matches_its_definition_for_a_conv_kernel():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3, 3, 3, generator=gen, dtype=DT)
    est = torch.randn(2, 3, 3, 3, generator=gen, dtype=DT)
    want = est.abs().mean(dim=(2, 3), keepdim=True).expand_as(est)
    assert torch.allclose(optim.spatial_average(est, w), want)
    lin = torch.randn(4, 5, dtype=DT)
    e2 = torch.randn(4, 5, dtype=DT)
    assert torch.allclose(optim.spatial_average(e2, lin), e2.abs())


# ---------------------------------------------------------------- Sophia


def test_sophiah_step_never_exceeds_lr_plus_decay():
    model, (x, y) = _mlp(), _data()
    lr, wd = 0.05, 0.1
    opt = optim.SophiaH(model.parameters(), lr=lr, rho=0.01, weight_decay=wd, update_every=2)
    for _ in range(15):
        before = _flat(model)
        opt.step(lambda: F.cross_entropy(model(x), y))
        step = (_flat(model) - before).abs()
        assert (step <= lr * (1 + wd * before.abs()) + 1e-12).all()


def _quadratic_first_step(curv, gvec, lr=0.1, rho=0.5, betas=(0.9, 0.99)):
    w = torch.zeros(len(curv), dtype=DT, requires_grad=True)
    opt = optim.SophiaH([w], lr=lr, betas=betas, rho=rho, weight_decay=0.0, update_every=1)
    opt.step(lambda: 0.5 * (curv * w**2).sum() + gvec @ w)
    return w.detach()


def test_sophiah_negative_curvature_gives_a_sign_step():
    # Diagonal Hessian: z * Hz = H_ii for every probe, so h_hat < 0 exactly.
    curv = torch.tensor([-1.0, -4.0, -0.01, -100.0], dtype=DT)
    g = torch.tensor([0.3, -2.0, 1e-3, -1e-4], dtype=DT)
    w = _quadratic_first_step(curv, g)
    assert torch.equal(w, -0.1 * torch.sign(g))


def test_sophiah_first_step_is_the_clipped_formula():
    curv = torch.tensor([1.0, 50.0, 2.0, 400.0], dtype=DT)
    g = torch.tensor([0.3, -2.0, 1e-3, 5.0], dtype=DT)
    lr, rho, (b1, b2) = 0.1, 0.5, (0.9, 0.99)
    w = _quadratic_first_step(curv, g, lr, rho, (b1, b2))
    m, h = (1 - b1) * g, (1 - b2) * curv
    want = -lr * torch.sign(m) * torch.clamp(m.abs() / (rho * h), max=1.0)
    assert torch.allclose(w, want, rtol=1e-12, atol=0)


def test_sophiag_without_logits_is_a_clear_error():
    model, (x, y) = _mlp(), _data()
    opt = optim.SophiaG(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="logits"):
        opt.step(lambda: F.cross_entropy(model(x), y))


def test_sophiag_accepts_loss_and_logits():
    model, (x, y) = _mlp(), _data()
    opt = optim.SophiaG(model.parameters(), lr=0.01, update_every=1)

    def closure():
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    first = opt.step(closure)
    assert torch.is_tensor(first) and first.dim() == 0


# ---------------------------------------------------------------- SAM / ASAM


def _two_layer(alpha=1.0):
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(3, 5, bias=False), nn.ReLU(), nn.Linear(5, 2, bias=False)).to(DT)
    with torch.no_grad():
        m[0].weight.mul_(alpha)
        m[2].weight.div_(alpha)
    return m


def _sam_run(model, adaptive, rho, lr=0.1):
    x, y = _data(1, 16)
    opt = optim.SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, lr=lr)
    seen = []

    def closure():
        seen.append((_flat(model), F.cross_entropy(model(x), y).detach()))
        return F.cross_entropy(model(x), y)

    theta0 = _flat(model)
    opt.step(closure)
    assert len(seen) == 2, "SAM evaluates the loss at theta and at theta + eps"
    return theta0, seen[1][0] - theta0, seen[1][1], _flat(model)


def test_sam_perturbation_has_norm_rho_and_the_step_uses_the_perturbed_gradient():
    model = _two_layer()
    x, y = _data(1, 16)
    rho, lr = 0.07, 0.1
    theta0, eps, _, theta1 = _sam_run(model, False, rho, lr)
    assert abs(eps.norm().item() - rho) < 1e-12

    ref = _two_layer()

    def grad_at(theta):
        loss = F.cross_entropy(functional_call(ref, _unflat(ref, theta), (x,)), y)
        return torch.autograd.grad(loss, theta)[0]

    g0 = grad_at(theta0.clone().requires_grad_())
    assert torch.allclose(eps, rho * g0 / g0.norm(), rtol=1e-10, atol=1e-14)
    g1 = grad_at((theta0 + eps).requires_grad_())
    assert torch.allclose(theta1, theta0 - lr * g1, rtol=1e-12, atol=1e-14)


def test_sam_perturbation_function_norm():
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(3, 4, generator=gen, dtype=DT), torch.randn(5, generator=gen, dtype=DT)]
    gs = [torch.randn_like(p) for p in ps]
    eps = optim.sam_perturbation(ps, gs, [0.3, 0.3], adaptive=False)
    assert abs(torch.cat([e.reshape(-1) for e in eps]).norm().item() - 0.3) < 1e-12
    eps = optim.sam_perturbation(ps, gs, [0.3, 0.3], adaptive=True)
    rel = torch.cat([(e / p.abs()).reshape(-1) for e, p in zip(eps, ps, strict=True)])
    assert abs(rel.norm().item() - 0.3) < 1e-12


def test_asam_perturbed_loss_is_invariant_to_rescaling_a_layer():
    *_, loss_a, _ = _sam_run(_two_layer(1.0), True, 0.5)
    *_, loss_b, _ = _sam_run(_two_layer(7.0), True, 0.5)
    assert abs(loss_a.item() - loss_b.item()) < 1e-10
    # SAM (not adaptive) is not invariant: the test can tell them apart.
    *_, sam_a, _ = _sam_run(_two_layer(1.0), False, 0.5)
    *_, sam_b, _ = _sam_run(_two_layer(7.0), False, 0.5)
    assert abs(sam_a.item() - sam_b.item()) > 1e-4


# ---------------------------------------------------------------- every optimizer


def _ce(model, x, y):
    return F.cross_entropy(model(x), y)


def _closure(kind, model, x, y):
    if kind == "sophiag":

        def closure():
            logits = model(x)
            return F.cross_entropy(logits, y), logits

        return closure
    return lambda: _ce(model, x, y)


FACTORIES = {
    "adahessian": lambda p, seed=0: optim.AdaHessian(p, lr=0.05, update_every=2, seed=seed),
    "sophiah": lambda p, seed=0: optim.SophiaH(p, lr=0.05, update_every=2, seed=seed),
    "sophiag": lambda p, seed=0: optim.SophiaG(p, lr=0.05, update_every=2, seed=seed),
    "sam": lambda p, seed=0: optim.SAM(p, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
    "asam": lambda p, seed=0: optim.SAM(p, torch.optim.SGD, rho=0.5, adaptive=True, lr=0.1),
    "mfac": lambda p, seed=0: optim.MFAC(p, lr=0.05, m=3, damping=1e-2, momentum=0.5),
    "newtoncg": lambda p, seed=0: optim.NewtonCG(p, lr=0.5, damping=1e-1, max_matvecs=5),
}


def _batch(step):
    return _data(100 + step, 12)


def _resume(kind):
    """Steps 4..7 of one run, and of a fresh optimizer resumed from a saved step 3."""
    make = FACTORIES[kind]
    model = _mlp(1)
    opt = make(model.parameters(), seed=5)
    for t in range(3):
        opt.step(_closure(kind, model, *_batch(t)))
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "model": model.state_dict()}, buf)
    ref = []
    for t in range(3, 7):
        opt.step(_closure(kind, model, *_batch(t)))
        ref.append(_flat(model))

    buf.seek(0)
    saved = torch.load(buf)
    fresh = _mlp(2)
    fresh.load_state_dict(saved["model"])
    opt2 = make(fresh.parameters(), seed=99)  # the generator state must come from the dict
    opt2.load_state_dict(saved["opt"])
    got = []
    for t in range(3, 7):
        opt2.step(_closure(kind, fresh, *_batch(t)))
        got.append(_flat(fresh))
    return got, ref


MFAC_DRIFT = (
    "issue 11 item 4 says 'identical'; MFAC's resumed steps drift by round-off "
    "(7e-18 at step 5, 3e-16 by step 9 on this float64 MLP)"
)


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=MFAC_DRIFT))
        if k == "mfac"
        else k
        for k in sorted(FACTORIES)
    ],
)
def test_state_dict_resume_gives_identical_steps(kind):
    got, ref = _resume(kind)
    for t, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert torch.equal(a, b), f"step {t + 4} differs after resuming: {(a - b).abs().max()}"


def test_mfac_resume_matches_to_round_off():
    got, ref = _resume("mfac")
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


GROUP_FACTORIES = {
    "adahessian": lambda g: optim.AdaHessian(g, lr=1.0, seed=0),
    "sophiah": lambda g: optim.SophiaH(g, lr=1.0, weight_decay=0.0, update_every=1),
    "sophiag": lambda g: optim.SophiaG(g, lr=1.0, weight_decay=0.0, update_every=1),
    "sam": lambda g: optim.SAM(g, torch.optim.SGD, rho=0.05, lr=1.0),
    "mfac": lambda g: optim.MFAC(g, lr=1.0, m=3, damping=1e-2),
    "newtoncg": lambda g: optim.NewtonCG(g, lr=1.0, damping=1e-1, max_matvecs=5),
}


@pytest.mark.parametrize("kind", sorted(GROUP_FACTORIES))
def test_param_groups_with_different_lr_scale_their_own_step(kind):
    make, (x, y) = GROUP_FACTORIES[kind], _data(7)
    one = _mlp(4)
    before = _flat(one)
    make(one.parameters()).step(_closure(kind, one, x, y))
    unit = _flat(one) - before

    two = _mlp(4)
    lrs = (0.3, 0.02)
    groups = [
        {"params": list(two[0].parameters()), "lr": lrs[0]},
        {"params": list(two[2].parameters()), "lr": lrs[1]},
    ]
    make(groups).step(_closure(kind, two, x, y))
    got = _flat(two) - before
    k = sum(p.numel() for p in two[0].parameters())
    assert torch.allclose(got[:k], lrs[0] * unit[:k], rtol=1e-9, atol=1e-15)
    assert torch.allclose(got[k:], lrs[1] * unit[k:], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_closure_without_a_loss_is_a_clear_error(kind):
    model = _mlp()
    opt = FACTORIES[kind](model.parameters())
    before = _flat(model)
    with pytest.raises((ValueError, TypeError), match="(?i)loss|closure"):
        opt.step(lambda: None)
    assert torch.equal(_flat(model), before), "a failed step must not move the parameters"


# ---------------------------------------------------------------- regularize


def _functional_mlp(theta, x):
    W1, b1, W2 = theta[:12].view(4, 3), theta[12:16], theta[16:24].view(2, 4)
    return torch.tanh(x @ W1.T + b1) @ W2.T


def _split(theta):
    return [theta[:12].view(4, 3), theta[12:16], theta[16:24].view(2, 4)]


def _leaves(theta):
    return [t.detach().clone().requires_grad_() for t in _split(theta)]


def _loss_from(ps, x, y):
    W1, b1, W2 = ps
    return F.cross_entropy(torch.tanh(x @ W1.T + b1) @ W2.T, y)


def _fd_gradient(f, theta, h=1e-5):
    out = torch.empty_like(theta)
    for i in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[i] = h
        out[i] = (f(theta + e) - f(theta - e)) / (2 * h)
    return out


def _theta0(seed=0):
    return torch.randn(24, dtype=DT, generator=torch.Generator().manual_seed(seed))


def _check_penalty_gradient(penalty):
    """Gradient of penalty(params) by autograd equals central finite differences."""
    theta = _theta0()

    def value(t):
        ps = _leaves(t)
        return penalty(ps).item()

    ps = _leaves(theta)
    grads = torch.autograd.grad(penalty(ps), ps)
    auto = torch.cat([g.reshape(-1) for g in grads])
    fd = _fd_gradient(value, theta)
    assert torch.allclose(auto, fd, rtol=1e-6, atol=1e-8), (auto - fd).abs().max()
    assert auto.abs().max() > 1e-3


def test_hessian_trace_gradient_equals_finite_differences():
    x, y = _data(3)
    _check_penalty_gradient(
        lambda ps: regularize.hessian_trace(_loss_from(ps, x, y), ps, probes=2, seed=11)
    )


def test_hessian_trace_is_unbiased_over_seeds():
    x, y = _data(3)
    theta = _theta0()
    H = hessian(lambda t: F.cross_entropy(_functional_mlp(t, x), y))(theta)
    n = 400
    vals = []
    for seed in range(n):
        ps = _leaves(theta)
        vals.append(regularize.hessian_trace(_loss_from(ps, x, y), ps, seed=seed).item())
    v = torch.tensor(vals, dtype=DT)
    # Var[z^T H z] = 2 (||H||_F^2 - sum_i H_ii^2) for Rademacher z.
    se = math.sqrt(2 * ((H**2).sum() - (H.diag() ** 2).sum()).item() / n)
    assert abs(v.mean().item() - H.trace().item()) < 5 * se


def test_gradient_norm_value_and_gradient():
    x, y = _data(3)
    theta = _theta0()
    g = torch.func.grad(lambda t: F.cross_entropy(_functional_mlp(t, x), y))(theta)
    ps = _leaves(theta)
    assert abs(regularize.gradient_norm(_loss_from(ps, x, y), ps).item() - g.norm().item()) < 1e-12
    _check_penalty_gradient(lambda ps: regularize.gradient_norm(_loss_from(ps, x, y), ps))


def test_hessian_alignment_hgp_value_and_gradient():
    envs = [_data(20 + e, 10) for e in range(3)]
    theta = _theta0()
    a, gs = [], []
    for x, y in envs:
        f = lambda t, x=x, y=y: F.cross_entropy(_functional_mlp(t, x), y)  # noqa: E731
        g = torch.func.grad(f)(theta)
        a.append(hessian(f)(theta) @ g)
        gs.append(g)
    A, G = torch.stack(a), torch.stack(gs)
    want = ((A - A.mean(0)) ** 2).sum(1).mean() + 0.5 * ((G - G.mean(0)) ** 2).sum(1).mean()

    def pen(ps, method="hgp"):
        losses = [_loss_from(ps, x, y) for x, y in envs]
        return regularize.hessian_alignment(losses, ps, method, gradient_weight=0.5, seed=2)

    ps = _leaves(theta)
    assert abs(pen(ps).item() - want.item()) < 1e-10 * max(1.0, want.item())
    _check_penalty_gradient(pen)
    _check_penalty_gradient(lambda ps: pen(ps, "hutchinson"))


# ---------------------------------------------------------------- more estimators and steps


def test_gauss_newton_bartlett_is_unbiased_for_the_ggn_diagonal():
    """SophiaG's estimate: E[B g_hat^2] = diag(J^T (diag p - p p^T) J) / B, logistic regression."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(DT)
    x, y = _data(5, 8)
    params = list(model.parameters())
    theta = _flat(model)
    J = torch.func.jacrev(lambda t: functional_call(model, _unflat(model, t), (x,)))(theta)
    p = torch.softmax(model(x), -1).detach()
    A = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    ggn = torch.einsum("bcd,bce,bef->df", J, A, J) / len(x)
    est, n, samples = optim.GaussNewtonBartlett(), 1500, []
    for seed in range(n):
        gen = torch.Generator().manual_seed(seed)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        total = est.contribution(est.draw(params, gen), params, grads, logits, gen)
        samples.append(torch.cat([t.detach().reshape(-1) for t in est.finish(total, len(x))]))
    S = torch.stack(samples)
    assert _z(S.mean(0) - ggn.diag(), S.std(0) / math.sqrt(n)) < 5


def test_mfac_steps_equal_the_dense_inverse_fisher_of_the_window():
    model, lam, lr, m = _mlp(6), 1e-2, 0.05, 2
    opt = optim.MFAC(model.parameters(), lr=lr, m=m, damping=lam)
    window = []
    for t in range(4):
        x, y = _batch(t)
        theta = _flat(model)
        g = torch.autograd.grad(_ce(model, x, y), list(model.parameters()))
        g = torch.cat([v.reshape(-1) for v in g])
        window = (window + [g])[-m:]
        G = torch.stack(window)
        Fm = lam * torch.eye(len(g), dtype=DT) + G.T @ G / len(window)
        opt.step(lambda x=x, y=y: _ce(model, x, y))
        want = theta - lr * torch.linalg.solve(Fm, g)
        assert torch.allclose(_flat(model), want, rtol=1e-10, atol=1e-13), f"step {t + 1}"


def test_sam_gradient_accumulation_in_the_closure_equals_the_whole_batch():
    x, y = _data(8, 16)
    one, two = _two_layer(), _two_layer()
    opt1 = optim.SAM(one.parameters(), torch.optim.SGD, rho=0.1, lr=0.2)
    opt2 = optim.SAM(two.parameters(), torch.optim.SGD, rho=0.1, lr=0.2)

    def accumulated():
        total = 0.0
        for xb, yb in ((x[:8], y[:8]), (x[8:], y[8:])):
            loss = F.cross_entropy(two(xb), yb) / 2
            loss.backward()
            total += loss.detach()
        return total

    for _ in range(3):
        opt1.step(lambda: F.cross_entropy(one(x), y))
        opt2.zero_grad()
        opt2.step(accumulated)
        assert torch.allclose(_flat(one), _flat(two), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["adahessian", "sophiah"])
def test_accumulated_micro_batches_equal_the_whole_batch(kind):
    x, y = _data(9, 16)
    one, two = _mlp(8), _mlp(8)
    opt1, opt2 = (
        FACTORIES[kind](one.parameters(), seed=3),
        FACTORIES[kind](two.parameters(), seed=3),
    )
    for _ in range(3):
        opt1.step(lambda: _ce(one, x, y))
        for xb, yb in ((x[:8], y[:8]), (x[8:], y[8:])):
            opt2.accumulate(_ce(two, xb, yb) / 2)
        opt2.step()
        assert torch.allclose(_flat(one), _flat(two), rtol=1e-10, atol=1e-13)


def test_estimate_is_refreshed_every_k_steps_from_step_0():
    model, (x, y) = _mlp(), _data()
    opt = optim.SophiaH(model.parameters(), lr=0.01, update_every=3)
    due = []
    for _ in range(7):
        due.append(opt.estimate_due)
        opt.step(lambda: _ce(model, x, y))
    assert due == [True, False, False, True, False, False, True]


def test_sam_under_bf16_autocast_on_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))  # float32
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    opt = optim.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    seen = []

    def closure():
        seen.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.cross_entropy(model(x), y)

    loss = opt.step(closure)
    assert torch.isfinite(loss)
    assert abs((seen[1] - seen[0]).norm().item() - 0.05) < 1e-5
    assert all(p.dtype == torch.float32 for p in model.parameters())


BAD_HYPERPARAMETERS = {
    "sam rho 0": lambda p: optim.SAM(p, torch.optim.SGD, rho=0.0, lr=0.1),
    "sam rho < 0": lambda p: optim.SAM(p, torch.optim.SGD, rho=-0.1, lr=0.1),
    "mfac m 0": lambda p: optim.MFAC(p, m=0),
    "mfac damping 0": lambda p: optim.MFAC(p, damping=0.0),
    "newton damping 0": lambda p: optim.NewtonCG(p, damping=0.0),
    "newton regularization < 0": lambda p: optim.NewtonCG(p, regularization=-1.0),
    "adahessian power 0": lambda p: optim.AdaHessian(p, hessian_power=0.0),
    "adahessian power 2": lambda p: optim.AdaHessian(p, hessian_power=2.0),
    "adahessian lr < 0": lambda p: optim.AdaHessian(p, lr=-0.1),
    "sophia beta 1": lambda p: optim.SophiaH(p, betas=(1.0, 0.99)),
    "sophia rho < 0": lambda p: optim.SophiaH(p, rho=-0.04),
    "sophia update_every 0": lambda p: optim.SophiaH(p, update_every=0),
    "hutchinson probes 0": lambda p: optim.SophiaH(p, probes=0),
}


@pytest.mark.parametrize("case", sorted(BAD_HYPERPARAMETERS))
def test_hyperparameters_out_of_range_are_errors(case):
    with pytest.raises(ValueError):
        BAD_HYPERPARAMETERS[case](_mlp().parameters())


def test_regularizer_bad_input_is_an_error():
    w = torch.ones(3, dtype=DT, requires_grad=True)
    with pytest.raises(ValueError):
        regularize.hessian_trace((w**3).sum(), [w], probes=0)
    with pytest.raises(ValueError):
        regularize.hessian_trace(w**3, [w])  # not a scalar
    with pytest.raises(ValueError):
        regularize.hessian_alignment([(w**3).sum()], [w])  # one domain
    with pytest.raises(ValueError):
        regularize.hessian_alignment([(w**3).sum(), (w**2).sum()], [w], method="bogus")


def test_newton_cg_on_an_indefinite_hessian_still_descends():
    A = torch.diag(torch.tensor([2.0, 1.0, -1.0, -3.0], dtype=DT))
    b = torch.tensor([1.0, -1.0, 0.5, 0.2], dtype=DT)
    x = torch.full((4,), 0.3, dtype=DT, requires_grad=True)

    def loss():
        return 0.5 * x @ A @ x - b @ x

    before = loss().item()
    g = (A @ x - b).detach()
    x0 = x.detach().clone()
    opt = optim.NewtonCG([x], lr=1.0, damping=1e-3, max_matvecs=10)
    opt.step(loss)
    step = x.detach() - x0
    assert torch.isfinite(step).all()
    assert g @ step < 0, "not a descent direction"
    assert loss().item() < before


def test_sam_groups_with_their_own_rho():
    model = _two_layer()
    x, y = _data(1, 16)
    groups = [
        {"params": [model[0].weight], "rho": 0.1},
        {"params": [model[2].weight], "rho": 0.02},
    ]
    opt = optim.SAM(groups, torch.optim.SGD, rho=0.05, lr=0.1)
    seen = []

    def closure():
        seen.append(_flat(model))
        return F.cross_entropy(model(x), y)

    loss = F.cross_entropy(model(x), y)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
    opt.step(closure)
    k = model[0].weight.numel()
    eps = seen[1] - seen[0]
    assert torch.allclose(eps[:k], 0.1 * g[:k] / g.norm(), rtol=1e-10, atol=1e-15)
    assert torch.allclose(eps[k:], 0.02 * g[k:] / g.norm(), rtol=1e-10, atol=1e-15)


def test_sophiag_accumulate_without_logits_is_an_error():
    model, (x, y) = _mlp(), _data()
    opt = optim.SophiaG(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="logits"):
        opt.accumulate(_ce(model, x, y))


def test_adahessian_shares_one_denominator_per_conv_kernel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 2))
    model = model.to(DT)
    x, y = torch.randn(6, 1, 6, 6, dtype=DT), torch.randint(0, 2, (6,))
    w = model[0].weight
    g = torch.autograd.grad(_ce(model, x, y), [w])[0]
    before = w.detach().clone()
    optim.AdaHessian(model.parameters(), lr=0.1, seed=0).step(lambda: _ce(model, x, y))
    ratio = (w.detach() - before).abs() / g.abs()  # lr / (mean_kernel |D| + eps)
    spread = ratio.amax(dim=(2, 3)) / ratio.amin(dim=(2, 3))
    assert torch.allclose(spread, torch.ones_like(spread), rtol=1e-10)
    assert ratio.amax() / ratio.amin() > 1.01  # kernels differ from each other


def test_adahessian_between_refreshes_keeps_the_second_moment_and_its_bias_correction():
    """update_every=2: step 2 reuses v_1, bias-corrected by (1 - beta2^1) (estimates, not steps)."""
    model, (x, y) = _mlp(9), _data(2)
    lr, eps, (b1, b2) = 0.1, 1e-4, (0.9, 0.999)
    opt = optim.AdaHessian(model.parameters(), lr=lr, eps=eps, betas=(b1, b2), update_every=2)

    def grad_now():
        loss = _ce(model, x, y)
        return torch.cat(
            [t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))]
        )

    g1, t0 = grad_now(), _flat(model)
    opt.step(lambda: _ce(model, x, y))
    t1 = _flat(model)
    d1 = lr * g1.abs() / (t1 - t0).abs() - eps  # |D_1| from the first step
    g2 = grad_now()
    opt.step(lambda: _ce(model, x, y))
    m2 = (b1 * (1 - b1) * g1 + (1 - b1) * g2) / (1 - b1**2)
    want = t1 - lr * m2 / (d1 + eps)
    assert torch.allclose(_flat(model), want, rtol=1e-8, atol=1e-12)


def test_sophiag_estimate_over_sequence_rows_is_unbiased_for_the_ggn_diagonal():
    """Logits (batch, time, classes): the rows are batch * time; state "hessian" with beta2 = 0."""
    torch.manual_seed(1)
    model0 = nn.Linear(3, 2).to(DT)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(3, 4, 3, generator=g, dtype=DT), torch.randint(0, 2, (3, 4), generator=g)
    theta = _flat(model0)
    J = torch.func.jacrev(lambda t: functional_call(model0, _unflat(model0, t), (x,)))(theta)
    J = J.reshape(12, 2, -1)
    p = torch.softmax(model0(x), -1).detach().reshape(12, 2)
    A = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    want = torch.einsum("bcd,bce,bed->d", J, A, J) / 12
    n, samples = 1500, []
    for seed in range(n):
        model = copy.deepcopy(model0)
        opt = optim.SophiaG(
            model.parameters(), lr=1e-3, betas=(0.9, 0.0), update_every=1, seed=seed
        )

        def closure(model=model):
            logits = model(x)
            return F.cross_entropy(logits.reshape(-1, 2), y.reshape(-1)), logits

        opt.step(closure)
        samples.append(torch.cat([opt.state[q]["hessian"].reshape(-1) for q in model.parameters()]))
    S = torch.stack(samples)
    assert _z(S.mean(0) - want, S.std(0) / math.sqrt(n)) < 5
