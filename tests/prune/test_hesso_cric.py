"""CRIC: the corrective cycle takes back a wrong early choice that plain HESSO keeps."""

import torch
import torch.nn.functional as F
from torch import nn

from hesse.prune import CRIC, HESSO


def _case(seed=0):
    """Four tanh neurons: 0 is small but needed, 3 is large but its output weight is zero.

    The magnitude and Taylor scores rank neuron 0 lowest; removing it loses the only reader
    of input 0 (the loss rises about fourfold), while neuron 3 contributes nothing and, at a
    saddle, cannot learn to replace neuron 0.
    """
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 4, generator=gen, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(torch.tensor([0.3, 1.0, 1.0, 1.0])))
        model[2].weight.copy_(torch.tensor([[0.3, 1.0, 1.0, 0.0]]))
        model[0].bias.zero_()
        model[2].bias.zero_()
        y = model(X) + 0.05 * torch.randn(256, 1, generator=gen, dtype=torch.float64)
    return model, X, y


def _run(cric):
    model, X, y = _case()
    opt = HESSO(model, lr=0.1, pruning_steps=10, target_group_sparsity=0.25, cric=cric)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(X), y)
        loss.backward()
        return loss

    while not opt.finished:
        opt.step(closure)
    with torch.no_grad():
        return model, X, opt.result(), F.mse_loss(model(X), y).item()


def test_cric_reverses_the_wrong_early_choice():
    _, _, plain, plain_loss = _run(None)
    model, X, result, loss = _run(CRIC(sampling_steps=10))
    assert [u.index for u in plain.units] == [0]  # plain HESSO removes the needed neuron
    assert [u.index for u in result.units] == [3]  # CRIC tried 0, charged it, removed 3
    assert {u.index for u in result.tried} == {0, 3} and result.cycles == 2
    assert loss < 0.7 * plain_loss
    assert result.zero_groups == 1 and result.finished
    small = result.apply(model)
    with torch.no_grad():
        torch.testing.assert_close(small(X), model(X), rtol=1e-12, atol=1e-12)
    assert small[0].out_features == 3


def test_cric_stops_after_max_cycles_and_restarts_from_its_starting_point():
    model, X, y = _case()
    start = [p.detach().clone() for p in model.parameters()]
    opt = HESSO(
        model, lr=0.1, pruning_steps=10, target_group_sparsity=0.25, cric=CRIC(5, max_cycles=1)
    )
    for _ in range(6):  # one cycle of 5 steps, then the restart
        opt.zero_grad()
        loss = F.mse_loss(model(X), y)
        loss.backward()
        opt.step(loss=loss)
    result = opt.result()
    assert result.cycles == 1 and not result.finished
    assert [u.index for u in result.tried] == [0]
    # restarted from the starting point; the chosen group is shrunk by (T - 1) / T
    (chosen,) = opt.active.nonzero().reshape(-1).tolist()
    f = torch.ones(4, dtype=torch.float64)
    f[chosen] = 0.9
    for p, p0 in zip(model.parameters(), opt.index.scale(start, f), strict=True):
        torch.testing.assert_close(p.detach(), p0, rtol=0, atol=0)


def test_state_dict_resumes_the_schedule_mid_cycle():
    def run(stop_at=None):
        model, X, y = _case()
        make = lambda m: HESSO(  # noqa: E731
            m, lr=0.1, pruning_steps=10, target_group_sparsity=0.25, cric=CRIC(5)
        )
        opt = make(model)
        for step in range(30):
            if step == stop_at:  # a fresh optimizer from the saved state
                saved = opt.state_dict()
                opt = make(model)
                opt.load_state_dict(saved)
            opt.zero_grad()
            loss = F.mse_loss(model(X), y)
            loss.backward()
            opt.step(loss=loss)
        return model, opt.result()

    model, result = run()
    resumed, again = run(stop_at=7)  # inside CRIC's second cycle
    assert result.units == again.units and result.cycles == again.cycles == 2
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
