"""Closed-form output Hessians of hesse.losses against torch.func.hessian, in float64."""

import pytest
import torch
from torch.func import hessian

from hesse import losses

DT = torch.float64
MULTICLASS = [
    losses.sum_exp,
    losses.cross_entropy,
    losses.gce(0.3),
    losses.gce(0.7),
    losses.mae,
    losses.CompSum(0.5),
    losses.CompSum(3.0),
    losses.ZLoss(),
    losses.ZLoss(a=3.0, b=-0.5),
    losses.SquaredError(),
]


def _logits(n, C, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, C, generator=g, dtype=DT), torch.randint(0, C, (n,), generator=g)


def _autograd(loss, f, y):
    N = f.numel()
    return hessian(lambda out: loss(out, y))(f).reshape(N, N)


def _targets(loss, f, y):
    if isinstance(loss, losses.SquaredError):  # float targets, one-hot here
        return torch.nn.functional.one_hot(y, f.shape[1]).to(DT)
    return y


@pytest.mark.parametrize("loss", MULTICLASS, ids=lambda x: x.spec)
@pytest.mark.parametrize("scale", [0.1, 3.0, 12.0])  # 12: p_y ~ 1e-10 for some rows
def test_multiclass_hessian_matches_autograd(loss, scale):
    f, y = _logits(6, 5, scale, seed=int(scale * 10))
    y = _targets(loss, f, y)
    want = _autograd(loss, f, y)
    got = loss.hessian(f, y)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12 * max(1.0, want.abs().max().item()))
    assert torch.allclose(got, got.T, atol=1e-14 * max(1.0, got.abs().max().item()))


@pytest.mark.parametrize("loss", MULTICLASS[:-1], ids=lambda x: x.spec)
def test_softmax_shift_is_a_null_direction(loss):
    f, y = _logits(4, 6, 2.0, seed=3)
    ones = torch.ones(4, 6, dtype=DT)
    Hv = loss.hessian_product(f, y, ones)
    assert Hv.abs().max() < 1e-12 * max(1.0, loss.hessian(f, y).abs().max().item())


def test_zloss_scale_direction_gives_minus_the_gradient():
    """Scale invariance: H o = -grad (not 0), so o does not lower the rank below C - 1."""
    f, y = _logits(3, 5, 1.5, seed=4)
    loss = losses.ZLoss(a=2.0, b=0.3)
    g = torch.func.grad(lambda out: loss(out, y))(f)
    assert torch.allclose(loss.hessian_product(f, y, f), -g, atol=1e-13)
    assert torch.linalg.matrix_rank(loss.sample_hessians(f, y)[0]).item() == 4


@pytest.mark.parametrize("seed", range(5))
def test_zloss_bends_down_along_one_direction(seed):
    """Every row's Hessian has a negative eigenvalue: at most C - 2 directions curve upward."""
    f, y = _logits(6, 7, 3.0, seed=seed)
    eig = torch.linalg.eigvalsh(losses.ZLoss(a=1.5, b=0.5).sample_hessians(f, y))
    scale = eig.abs().amax(1, keepdim=True)
    assert ((eig < -1e-9 * scale).sum(1) >= 1).all()
    assert ((eig > 1e-9 * scale).sum(1) <= 5).all()


def test_products_with_many_directions():
    f, y = _logits(5, 4, 1.0, seed=5)
    loss = losses.gce(0.7)
    V = torch.randn(3, 5, 4, dtype=DT)
    H = loss.hessian(f, y)
    want = (H @ V.reshape(3, -1).T).T.reshape(3, 5, 4)
    assert torch.allclose(loss.hessian_product(f, y, V), want, atol=1e-14)


def _min_eig(loss, seeds, n=4, C=5):
    return min(
        torch.linalg.eigvalsh(loss.hessian(*_logits(n, C, 4.0, seed=s))).min().item() for s in seeds
    )


@pytest.mark.parametrize("loss", MULTICLASS[:-1], ids=lambda x: x.spec)
def test_declared_convexity(loss):
    """convex=True: PSD at every draw; convex=False: some draw shows a negative eigenvalue."""
    low = _min_eig(loss, range(20))
    if loss.convex:
        assert low > -1e-12
    else:
        assert low < -1e-4


def test_adversarial_hessian_matches_autograd():
    g = torch.Generator().manual_seed(6)
    f = torch.randn(4, 2, 3, generator=g, dtype=DT)
    y = torch.tensor([0, 2, 1, 1])
    for loss in (losses.SmoothAdvCompSum(1.0, 2.0), losses.SmoothAdvCompSum(1.5, 0.5)):
        assert torch.allclose(loss.hessian(f, y), _autograd(loss, f, y), atol=1e-12)
    assert losses.SmoothAdvCompSum(1.0).convex and not losses.SmoothAdvCompSum(1.5).convex


def test_adversarial_pairs_move_the_margins_within_the_ball():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4).double()
    x, y = torch.randn(5, 3, dtype=DT), torch.tensor([0, 1, 2, 3, 0])
    pairs = losses.adversarial_pairs(model, x, y, eps=0.1, steps=5)
    assert pairs.shape == (5, 2, 3) and torch.equal(pairs[:, 0], x)
    assert (pairs[:, 1] - x).abs().max() <= 0.1 + 1e-15
    out = losses.Paired(model)(pairs)
    assert out.shape == (5, 2, 4)
    loss = losses.SmoothAdvCompSum(1.0, 1.0)
    assert loss(out, y) > losses.cross_entropy(out[:, 0], y)


@pytest.mark.parametrize("metric", losses.METRICS)
@pytest.mark.parametrize("L", [5.0, 73.0])
def test_anyloss_hessian_matches_autograd(metric, L):
    g = torch.Generator().manual_seed(7)
    f = torch.randn(9, 1, generator=g, dtype=DT) * (0.05 if L == 73 else 1.0)
    y = torch.tensor([1, 0, 0, 1, 0, 0, 1, 0, 1])
    loss = losses.AnyLoss(metric, beta=2.0, L=L)
    want = _autograd(loss, f, y)
    assert want.abs().max() > 1e-6  # not a saturated, trivially zero case
    assert torch.allclose(loss.hessian(f, y), want, rtol=1e-9, atol=1e-13)
    assert not loss.convex and not loss.decomposable


def test_anyloss_values_are_the_papers_metrics_when_saturated():
    f = torch.tensor([20.0, 20.0, -20.0, -20.0, 20.0], dtype=DT)  # predictions 1, 1, 0, 0, 1
    y = torch.tensor([1, 0, 0, 1, 1])  # TP 2, FP 1, TN 1, FN 1
    want = {
        "accuracy": 3 / 5,
        "f_beta": 4 / 6,
        "g_mean": (2 / 3 * 1 / 2) ** 0.5,
        "balanced_accuracy": (2 / 3 + 1 / 2) / 2,
    }
    for metric, m in want.items():
        assert float(losses.AnyLoss(metric)(f, y)) == pytest.approx(1 - m, abs=1e-9)


def test_anyloss_refuses_batches_without_the_classes_it_needs():
    f = torch.zeros(3, dtype=DT)
    with pytest.raises(ValueError, match="both classes"):
        losses.AnyLoss("g_mean")(f, torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="a positive"):
        losses.AnyLoss("f_beta")(f, torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="0 or 1"):
        losses.AnyLoss()(f, torch.tensor([0, 2, 1]))


def test_shape_errors_say_what_to_pass():
    with pytest.raises(ValueError, match=r"\(n, C\) logits"):
        losses.gce(0.7)(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="Paired"):
        losses.SmoothAdvCompSum()(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="tau"):
        losses.CompSum(-1.0)
    with pytest.raises(ValueError, match="q must be"):
        losses.gce(0.0)
