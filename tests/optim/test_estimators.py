import torch
import torch.nn.functional as F
from optim_models import conv, data, dense_hessian, flat, mlp

from hesse import Objective
from hesse.operators.reference import dense_ggn
from hesse.optim import (
    AdaHessian,
    GaussNewtonBartlett,
    Hutchinson,
    adahessian_update,
    rademacher,
    spatial_average,
)


def test_rademacher_probes_are_plus_and_minus_one_in_equal_parts():
    z = rademacher(torch.empty(10_000, dtype=torch.float64), torch.Generator().manual_seed(0))
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 4 / 100  # 4 standard errors of a mean of 10,000 signs


def _samples(estimator, model, x, y, n, logits=False):
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        out_logits = model(x)
        loss = F.cross_entropy(out_logits, y)
        grads = torch.autograd.grad(
            loss, params, create_graph=estimator.needs_graph, retain_graph=True
        )
        probes = estimator.draw(params, gen)
        share = estimator.contribution(probes, params, grads, out_logits, gen)
        out.append(flat(estimator.finish(share, len(x))))
    return torch.stack(out)


def _assert_unbiased(samples, exact):
    mean = samples.mean(0)
    stderr = samples.std(0) / len(samples) ** 0.5
    assert ((mean - exact).abs() <= 4.5 * stderr + 1e-10).all()
    # and the test has power: a biased estimator (the row sums) is caught
    return mean


def test_hutchinson_is_unbiased_for_the_hessian_diagonal():
    model, (x, y) = mlp(), data()
    H = dense_hessian(model, x, y)
    samples = _samples(Hutchinson(), model, x, y, 400)
    _assert_unbiased(samples, H.diagonal())
    row_sums = H.sum(1)
    assert not ((samples.mean(0) - row_sums).abs() <= 4.5 * samples.std(0) / 400**0.5).all()


def test_gauss_newton_bartlett_has_the_diagonal_ggn_as_mean_on_logistic_regression():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3).double()
    x, y = data(n=6)
    G = dense_ggn(Objective(model, [(x, y)], loss=F.cross_entropy))
    samples = _samples(GaussNewtonBartlett(), model, x, y, 3000, logits=True)
    _assert_unbiased(samples, G.diagonal())


def test_spatial_average_is_the_kernel_mean_of_absolute_values():
    gen = torch.Generator().manual_seed(0)
    weight = torch.zeros(4, 2, 3, 3)
    est = torch.randn(4, 2, 3, 3, generator=gen)
    out = spatial_average(est, weight)
    for o in range(4):
        for i in range(2):
            assert torch.allclose(out[o, i], est[o, i].abs().mean().expand(3, 3))
    bias_est = torch.randn(4, generator=gen)
    assert torch.equal(spatial_average(bias_est, torch.zeros(4)), bias_est.abs())


def test_adahessian_first_step_follows_its_definition_on_a_conv_model():
    model, (x, y) = conv(), data(image=True)
    ref = conv()
    opt = AdaHessian(model.parameters(), lr=0.1, weight_decay=0.01, seed=3)
    opt.step(lambda: F.cross_entropy(model(x), y))
    params = list(ref.parameters())
    grads = torch.autograd.grad(F.cross_entropy(ref(x), y), params, create_graph=True)
    gen = torch.Generator().manual_seed(3)
    z = [rademacher(p, gen) for p in params]
    Hz = torch.autograd.grad(grads, params, z)
    hyper = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.01, hessian_power=1.0)
    for p, g, zi, hi, got in zip(params, grads, z, Hz, model.parameters(), strict=True):
        d = spatial_average(zi * hi, p)
        want, _ = adahessian_update(p.detach(), g.detach(), d, {}, **hyper)
        assert torch.allclose(got.detach(), want, rtol=1e-12, atol=1e-14)
    assert model[0].weight.dim() == 4  # the conv kernel went through the spatial average


def test_hutchinson_skips_parameters_the_loss_does_not_reach():
    used = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = AdaHessian([used, unused], lr=0.1, seed=0)
    opt.step(lambda: (used**4).sum())
    assert torch.equal(unused.detach(), torch.ones(3, dtype=torch.float64))
    assert not torch.equal(used.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64))
