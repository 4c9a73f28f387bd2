import pytest
import torch
import torch.nn.functional as F
from optim_models import closure, data, mlp, params_vector

from hesse.optim import SAM, sam_perturbation


def _perturbation(model, x, y, **kw):
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, **kw)
    params = list(model.parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    before = [p.detach().clone() for p in params]
    opt.first_step(list(grads))
    eps = [p.detach() - b for p, b in zip(params, before, strict=True)]
    return opt, params, before, eps


def test_sam_perturbation_has_norm_rho():
    x, y = data()
    _, _, _, eps = _perturbation(mlp(), x, y, rho=0.07)
    assert torch.cat([e.reshape(-1) for e in eps]).norm().item() == pytest.approx(0.07, rel=1e-10)


def test_asam_perturbation_has_norm_rho_relative_to_the_weights():
    x, y = data()
    _, _, before, eps = _perturbation(mlp(), x, y, rho=0.07, adaptive=True)
    scaled = torch.cat([(e / b.abs()).reshape(-1) for e, b in zip(eps, before, strict=True)])
    assert scaled.norm().item() == pytest.approx(0.07, rel=1e-10)


def _relu_net(scale: float):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    net = net.double()
    with torch.no_grad():  # f is unchanged: relu(c z) = c relu(z) for c > 0
        net[0].weight.mul_(scale)
        net[0].bias.mul_(scale)
        net[2].weight.div_(scale)
    return net


@pytest.mark.parametrize("adaptive", [True, False])
def test_only_asam_is_invariant_to_rescaling_a_layer(adaptive):
    x, y = data()
    losses = []
    for scale in (1.0, 7.0):
        net = _relu_net(scale)
        params = list(net.parameters())
        grads = torch.autograd.grad(F.cross_entropy(net(x), y), params)
        eps = sam_perturbation(params, grads, [0.2] * len(params), adaptive=adaptive)
        with torch.no_grad():
            for p, e in zip(params, eps, strict=True):
                p.add_(e)
            losses.append(F.cross_entropy(net(x), y).item())
    same = losses[0] == pytest.approx(losses[1], rel=1e-10)
    assert same == adaptive


def test_a_step_returns_to_the_saved_weights_exactly():
    x, y = data()
    model = mlp()
    before = params_vector(model)
    SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0).step(closure(model, x, y))
    assert torch.equal(params_vector(model), before)


def test_gradient_accumulation_in_the_closure_equals_one_batch():
    x, y = data()
    whole, parts = mlp(), mlp()
    opt_whole = SAM(whole.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    opt_parts = SAM(parts.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)

    def accumulating():
        total = 0.0
        for idx in (slice(0, 5), slice(5, 12)):  # uneven micro-batches, weighted by size
            loss = F.cross_entropy(parts(x[idx]), y[idx]) * len(x[idx]) / len(x)
            loss.backward()
            total = total + loss.detach()
        return total

    for _ in range(3):
        opt_whole.step(closure(whole, x, y))
        opt_parts.step(accumulating)
    assert torch.allclose(params_vector(parts), params_vector(whole), rtol=1e-12, atol=1e-14)


def test_the_ascent_under_bf16_autocast_has_norm_rho():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = data()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    params = list(model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads = torch.autograd.grad(F.cross_entropy(model(x.float()), y), params)
        before = [p.detach().clone() for p in params]
        opt.first_step(list(grads))
    eps = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(params, before, strict=True)])
    assert eps.norm().item() == pytest.approx(0.05, rel=1e-5)


def test_rho_must_be_positive():
    with pytest.raises(ValueError, match="rho"):
        SAM(mlp().parameters(), torch.optim.SGD, rho=0.0, lr=0.1)
