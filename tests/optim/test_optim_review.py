"""Review fixes: no gradient, no step; SAF's reference epoch; averaging over conv kernels only."""

import pytest
import torch
import torch.nn.functional as F
from optim_models import data, mlp
from torch import nn

from hesse import optim

# --- parameters without a gradient (an unused head) ---------------------------------------


class _SpareHead(nn.Module):
    """A body and a head that the loss uses, and a spare head that it uses only when weighted."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head, self.spare = nn.Linear(3, 4), nn.Linear(4, 3), nn.Linear(4, 3)
        self.double()

    def forward(self, x, spare_weight=None):
        h = torch.tanh(self.body(x))
        out = self.head(h)
        return out if spare_weight is None else out + spare_weight * self.spare(h)


MAKERS = {  # momentum and weight decay wherever the optimizer has them
    "AdaHessian": lambda p: optim.AdaHessian(p, lr=0.05, weight_decay=0.1, update_every=2),
    "SophiaH": lambda p: optim.SophiaH(p, lr=0.01, weight_decay=0.1, update_every=2),
    "SophiaG": lambda p: optim.SophiaG(p, lr=0.01, weight_decay=0.1, update_every=2),
    "Sophia": lambda p: optim.Sophia(
        p, lr=0.01, weight_decay=0.1, update_every=1, estimator=optim.Hutchinson(probes=2)
    ),
    "SAM": lambda p: optim.SAM(p, torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.1),
    "ASAM": lambda p: optim.SAM(
        p, torch.optim.SGD, adaptive=True, lr=0.1, momentum=0.9, weight_decay=0.1
    ),
    "MFAC": lambda p: optim.MFAC(p, lr=0.01, m=3, damping=0.1, momentum=0.9, weight_decay=0.1),
    "NewtonCG": lambda p: optim.NewtonCG(p, lr=0.5, damping=0.5, max_matvecs=6),
}


def _train(name, spare_weight, steps=5):
    """The model and optimizer after ``steps`` steps; the spare head weighted or unused."""
    model, (x, y) = _SpareHead(), data()
    opt = MAKERS[name](model.parameters())

    def closure():
        logits = model(x, spare_weight)
        loss = F.cross_entropy(logits, y)
        return (loss, logits) if name == "SophiaG" else loss

    for _ in range(steps):
        opt.step(closure)
    return model, opt


def _states(opt) -> list[dict]:
    return [opt.state] + ([opt.base_optimizer.state] if isinstance(opt, optim.SAM) else [])


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_a_parameter_without_gradient_keeps_its_value_and_gets_no_state(name):
    start = _SpareHead()
    model, opt = _train(name, spare_weight=None)
    for p, p0 in zip(model.spare.parameters(), start.spare.parameters(), strict=True):
        assert torch.equal(p.detach(), p0.detach())
        assert all(p not in state for state in _states(opt))
    # the used parameters move exactly as when the spare head has a zero gradient (which is
    # not None: there, as in torch.optim, decay and momentum do move the spare head)
    zero_grad, _ = _train(name, spare_weight=0.0)
    for p, q, p0 in zip(
        model.parameters(), zero_grad.parameters(), start.parameters(), strict=True
    ):
        if not any(p is s for s in model.spare.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
            assert not torch.equal(p.detach(), p0.detach())
    if name != "NewtonCG":  # the only one without decay or momentum
        assert not torch.equal(zero_grad.spare.weight.detach(), start.spare.weight.detach())


def test_accumulated_micro_batches_step_only_the_parameters_some_micro_batch_reaches():
    model, (x, y) = _SpareHead(), data()
    start = _SpareHead()
    opt = optim.AdaHessian(model.parameters(), lr=0.05, weight_decay=0.1)
    for _ in range(3):
        opt.accumulate(F.cross_entropy(model(x[:5]), y[:5]) / 2)
        opt.accumulate(F.cross_entropy(model(x[5:]), y[5:]) / 2)
        opt.step()
    assert torch.equal(model.spare.weight.detach(), start.spare.weight.detach())
    assert model.spare.weight not in opt.state
    assert not torch.equal(model.head.weight.detach(), start.head.weight.detach())


def test_first_order_optimizers_skip_a_none_grad_from_backward_or_from_the_user():
    x, y = data()
    model, start = _SpareHead(), _SpareHead()
    sam = optim.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.1)
    mfac = optim.MFAC(model.parameters(), lr=0.01, m=3, damping=0.1, weight_decay=0.1)

    def backward_closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        sam.step(backward_closure)
        mfac.zero_grad()
        F.cross_entropy(model(x), y).backward()
        mfac.step()
    assert torch.equal(model.spare.weight.detach(), start.spare.weight.detach())
    assert not torch.equal(model.head.weight.detach(), start.head.weight.detach())


def test_adahessian_refuses_a_first_gradient_between_refreshes_and_says_why():
    """Once zeros were the estimate there, and the step was lr * g / eps: now it is an error."""
    model, (x, y) = _SpareHead(), data()
    opt = optim.AdaHessian(model.parameters(), lr=0.05, update_every=2)
    opt.step(lambda: F.cross_entropy(model(x), y))
    with pytest.raises(ValueError, match="between two refreshes"):
        opt.step(lambda: F.cross_entropy(model(x, spare_weight=1.0), y))


# --- SAF: the reference is the output of an earlier epoch ---------------------------------


def _saf(reference, logits, tau, weight):
    """SAF's trajectory loss, from its definition (Du et al. 2022, eq. 8)."""
    p_ref = F.softmax(reference / tau, -1)
    kl = (p_ref * (p_ref.log() - F.log_softmax(logits / tau, -1))).sum(-1)
    return weight * tau**2 * kl.mean()


def test_a_sample_seen_twice_in_an_epoch_is_compared_with_the_earlier_epoch_both_times():
    gen = torch.Generator().manual_seed(0)
    traj = optim.TrajectoryLoss(5, 4, lag=2, temperature=2.0, weight=0.5)
    outputs = [torch.randn(5, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    for epoch in (0, 1):
        traj(outputs[epoch], torch.arange(5), epoch=epoch)
    idx = torch.tensor([3, 1])  # drawn with replacement: seen twice in epoch 2
    for _ in range(2):
        now = torch.randn(2, 4, generator=gen, dtype=torch.float64)
        got = traj(now, idx, epoch=2)
        want = _saf(outputs[0][idx], now, tau=2.0, weight=0.5)
        assert got.item() == pytest.approx(want.item(), rel=1e-6) and want.item() > 1e-3


def test_sams_two_closure_calls_both_see_the_earlier_epoch_and_record_the_unperturbed_output():
    model, (x, y) = mlp(), data(n=6)
    traj, idx = optim.TrajectoryLoss(6, 3, lag=1), torch.arange(6)
    opt = optim.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    calls = []

    def closure(epoch):
        logits = model(x)
        penalty = traj(logits, idx, epoch)
        calls.append((logits.detach(), penalty.item()))
        return F.cross_entropy(logits, y) + penalty

    for epoch in (0, 1):
        opt.step(lambda epoch=epoch: closure(epoch))
    unperturbed_epoch_0 = calls[0][0].float().double()  # stored in float32
    for logits, penalty in calls[2:]:
        want = _saf(unperturbed_epoch_0, logits, tau=1.0, weight=1.0)
        assert penalty == pytest.approx(want.item(), rel=1e-5) and want.item() > 1e-6


# --- AdaHessian's spatial averaging: convolution weights only, by module type ---------------


class _PosConv(nn.Module):
    """A Conv2d, a ViT-style ``(1, N, D)`` position embedding and a 4-D non-conv scale."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.pos = nn.Parameter(0.5 * torch.randn(1, 4, 8))
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(1, 2, 4, 4))
        self.head = nn.Linear(8, 3)
        self.double()

    def forward(self, x):  # x: (B, 1, 4, 4) -> 4 tokens of 2 channels x 4 columns
        h = torch.tanh(self.conv(x) * self.scale)
        tokens = torch.tanh(h.permute(0, 2, 1, 3).reshape(len(x), 4, 8) + self.pos)
        return self.head(tokens.mean(1))


class _Conv1d(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = nn.Conv1d(1, 2, 3, padding=1), nn.Linear(8, 3)
        self.double()

    def forward(self, x):  # x: (B, 1, 4, 4) read as (B, 1, 16) -> 8 features
        return self.head(torch.tanh(self.conv(x.reshape(len(x), 1, 16)))[..., ::4].flatten(1))


def _expected_first_step(model, x, y, averaged: set[str], seed=3, lr=0.1):
    """AdaHessian's first step from its definition: Hutchinson with the optimizer's probes."""
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
    gen = torch.Generator().manual_seed(seed)
    z = [optim.rademacher(p, gen) for p in params]
    Hz = torch.autograd.grad(grads, params, z)
    hyper = dict(lr=lr, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0, hessian_power=1.0)
    out = {}
    for name, p, g, zi, hi in zip(names, params, grads, z, Hz, strict=True):
        d = zi * hi
        if name in averaged:
            d = d.abs().mean(dim=tuple(range(2, p.dim())), keepdim=True).expand_as(d)
        out[name], _ = optim.adahessian_update(p.detach(), g.detach(), d, {}, **hyper)
    return out


@pytest.mark.parametrize(
    ("make", "pass_model", "averaged"),
    [
        (_PosConv, True, {"conv.weight"}),
        (_PosConv, False, {"conv.weight", "scale"}),  # without the model: 4-D parameters
        (_Conv1d, True, {"conv.weight"}),
    ],
)
def test_adahessian_averages_the_estimate_over_convolution_kernels_only(make, pass_model, averaged):
    x, y = data(image=True)
    model = make()
    want = _expected_first_step(make(), x, y, averaged)
    kwargs = {"model": model} if pass_model else {}
    opt = optim.AdaHessian(model.parameters(), lr=0.1, seed=3, **kwargs)
    opt.step(lambda: F.cross_entropy(model(x), y))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[name], rtol=1e-12, atol=1e-14)


def test_the_position_embedding_estimate_is_not_the_averaged_one():
    """The test above has power: averaging the embedding's estimate changes its step."""
    x, y = data(image=True)
    plain = _expected_first_step(_PosConv(), x, y, {"conv.weight"})
    averaged = _expected_first_step(_PosConv(), x, y, {"conv.weight", "pos"})
    assert (plain["pos"] - averaged["pos"]).abs().max() > 1e-4
