import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from hesse.optim import rademacher
from hesse.regularize import gradient_norm, hessian_alignment, hessian_trace


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)
    ).double()


def _envs(n_envs=3):
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(6, 3, generator=gen, dtype=torch.float64) + e,
            torch.randint(0, 3, (6,), generator=gen),
        )
        for e in range(n_envs)
    ]


def _loss_at(model, theta, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    pieces = torch.split(theta, [s.numel() for s in shapes])
    params = {n: t.view(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
    return F.cross_entropy(functional_call(model, params, (x,)), y)


def _theta(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _check_gradient(model, penalty):
    """The autograd gradient of ``penalty(params)`` against central differences, on 3 directions."""
    params = list(model.parameters())
    value = penalty(params)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)])
    theta = _theta(model)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        v = torch.randn(len(theta), generator=gen, dtype=torch.float64)
        h = 1e-5
        ends = []
        for sign in (1, -1):
            leaf = (theta + sign * h * v).requires_grad_(True)
            ends.append(penalty([leaf], flat=True).item())
        fd = (ends[0] - ends[1]) / (2 * h)
        assert fd == pytest.approx((grad @ v).item(), rel=1e-6, abs=1e-9)


def _penalty_fn(model, fn):
    """``fn(losses, params)`` of the model's parameters, or of one flat leaf (``flat=True``)."""

    def penalty(params, flat=False):
        theta = params[0] if flat else None
        if flat:
            losses = [_loss_at(model, theta, x, y) for x, y in _envs()]
        else:
            losses = [F.cross_entropy(model(x), y) for x, y in _envs()]
        return fn(losses, params)

    return penalty


def _dense_hessian(model, x, y):
    return torch.autograd.functional.hessian(lambda t: _loss_at(model, t, x, y), _theta(model))


def test_hessian_trace_is_unbiased():
    model = _model()
    x, y = _envs(1)[0]
    exact = _dense_hessian(model, x, y).trace().item()
    draws = torch.tensor(
        [
            hessian_trace(F.cross_entropy(model(x), y), model.parameters(), seed=s).item()
            for s in range(300)
        ]
    )
    stderr = draws.std().item() / 300**0.5
    assert abs(draws.mean().item() - exact) <= 4 * stderr
    assert stderr < 0.2 * abs(exact)  # the check can fail: the spread is small against the trace


def test_hessian_trace_gradient_equals_finite_differences():
    model = _model()
    _check_gradient(
        model, _penalty_fn(model, lambda L, p: hessian_trace(L[0], p, probes=2, seed=3))
    )


def test_gradient_norm_value_and_gradient():
    model = _model()
    x, y = _envs(1)[0]
    g = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    want = torch.cat([t.reshape(-1) for t in g]).norm().item()
    got = gradient_norm(F.cross_entropy(model(x), y), model.parameters()).item()
    assert got == pytest.approx(want, rel=1e-12)
    _check_gradient(model, _penalty_fn(model, lambda L, p: gradient_norm(L[0], p)))


def test_hgp_alignment_matches_dense_hessians():
    model = _model()
    envs = _envs()
    a, g = [], []
    for x, y in envs:
        H = _dense_hessian(model, x, y)
        gi = torch.autograd.functional.jacobian(
            lambda t, x=x, y=y: _loss_at(model, t, x, y), _theta(model)
        )
        a.append(H @ gi)
        g.append(gi)
    A, G = torch.stack(a), torch.stack(g)
    want = ((A - A.mean(0)) ** 2).sum() / 3 + 0.5 * ((G - G.mean(0)) ** 2).sum() / 3
    losses = [F.cross_entropy(model(x), y) for x, y in envs]
    got = hessian_alignment(losses, model.parameters(), "hgp", gradient_weight=0.5)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)


def test_hutchinson_alignment_matches_dense_hessians_with_the_same_probes():
    model = _model()
    envs = _envs()
    gen = torch.Generator().manual_seed(4)
    Z = [torch.cat([rademacher(p, gen).reshape(-1) for p in model.parameters()]) for _ in range(2)]
    D = torch.stack([sum(z * (_dense_hessian(model, x, y) @ z) for z in Z) / 2 for x, y in envs])
    want = ((D - D.mean(0)) ** 2).sum() / 3
    losses = [F.cross_entropy(model(x), y) for x, y in envs]
    got = hessian_alignment(
        losses, model.parameters(), "hutchinson", gradient_weight=0.0, probes=2, seed=4
    )
    assert got.item() == pytest.approx(want.item(), rel=1e-10)


@pytest.mark.parametrize("method", ["hgp", "hutchinson"])
def test_alignment_gradient_equals_finite_differences(method):
    model = _model()
    fn = lambda L, p: hessian_alignment(L, p, method, seed=5)  # noqa: E731
    _check_gradient(model, _penalty_fn(model, fn))


def test_bad_inputs_are_refused():
    model = _model()
    x, y = _envs(1)[0]
    loss = F.cross_entropy(model(x), y)
    with pytest.raises(ValueError, match="two domains"):
        hessian_alignment([loss], model.parameters())
    with pytest.raises(ValueError, match="method"):
        hessian_alignment([loss, loss], model.parameters(), method="exact")
    with pytest.raises(ValueError, match="scalar tensor"):
        hessian_trace(loss.detach(), model.parameters())
