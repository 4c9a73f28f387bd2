"""Contract tests of issue 11: what every optimizer of hesse.optim must do, and SAM/ASAM.

state_dict resume, parameter groups, closures and bad input, gradient accumulation, AMP; SAM's
and ASAM's perturbations, M-FAC's and Newton-CG's steps against dense references.
"""

import io

import pytest
import torch
import torch.nn.functional as F
from contract_models import DT, _ce, _data, _flat, _mlp, _unflat
from torch import nn
from torch.func import functional_call

from hesse import optim

torch.set_num_threads(1)


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


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_state_dict_resume_gives_identical_steps(kind):
    got, ref = _resume(kind)
    for t, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert torch.equal(a, b), f"step {t + 4} differs after resuming: {(a - b).abs().max()}"


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
