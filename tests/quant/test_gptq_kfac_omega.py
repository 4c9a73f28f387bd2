"""Ω = ½ tr(ΔW A ΔWᵀ G): the GPTQ error under the KFAC GGN, against dense references (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hesse
from hesse import quant, reference
from hesse.quant._gptq_layer import gptq_layer


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 5)).double().eval()
    X = torch.randn(96, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)
    y = torch.randint(0, 5, (96,))
    return net, X, y


def test_kfac_omega_is_the_dense_kronecker_quadratic_form_of_the_gptq_error():
    net, X, y = _net()
    obj = hesse.Objective(
        net, [(X[:48], y[:48]), (X[48:], y[48:])], loss=nn.functional.cross_entropy
    )
    sens = quant.sensitivity(
        obj, (2, 3, 4), method="kfac", quantizer=quant.Quantizer(4, "group", 8)
    )
    g = quant.gptq_sensitivity(sens, net, [(X, y)], group_size=8, measure="kfac", curvature=obj)
    K = hesse.KFACOperator(obj.restrict(["0.weight", "2.weight"]))
    hidden = torch.tanh(net[0](X)).detach()
    for name, inputs in (("0", X), ("2", hidden)):
        ((G, A),) = K.factors[name].terms  # one Kronecker term G ⊗ A per layer
        W = dict(net.named_modules())[name].weight
        H = 2 * inputs.T @ inputs / inputs.shape[0]
        for b in (2, 3, 4):
            r = gptq_layer(W, H, bits=b, group_size=8, scale_dtype=W.dtype)
            v = (r.weight - W).detach().reshape(-1)  # row-major vec of (out, in)
            dense = 0.5 * v @ torch.kron(G, A) @ v
            assert g[name].omega[b] == pytest.approx(float(dense), rel=1e-10)
            D = (r.weight - W).detach()
            assert g[name].omega[b] == pytest.approx(
                float(0.5 * torch.trace(D @ A @ D.T @ G)), rel=1e-10
            )
        assert g[name].omega[2] > g[name].omega[3] > g[name].omega[4] > 0
    assert g.settings["omega"].startswith("1/2 tr") and g["0"].delta_sq == sens["0"].delta_sq
    again = quant.gptq_sensitivity(sens, net, [(X, y)], group_size=8, measure="kfac", curvature=K)
    assert [r.omega for r in again.layers] == [r.omega for r in g.layers]  # deterministic
    alloc = quant.allocate(g, budget=(16 * 24 + 24 * 5) * 3 / 8)
    assert set(alloc.bits.values()) <= {2, 3, 4}


def test_kfac_omega_of_one_linear_layer_is_the_exact_ggn_quadratic_form():
    """One linear layer with squared loss: KFAC is the GGN, so Ω is ½ ΔᵀGGNΔ exactly."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(16, 6)).double().eval()
    X = torch.randn(64, 16, dtype=torch.float64) * torch.linspace(0.2, 3.0, 16, dtype=torch.float64)
    T = torch.randn(64, 6, dtype=torch.float64)
    obj = hesse.Objective(net, [(X, T)], loss=nn.functional.mse_loss, params=["0.weight"])
    sens = quant.sensitivity(obj, (2, 3), method="kfac", quantizer=quant.Quantizer(4, "group", 8))
    g = quant.gptq_sensitivity(sens, net, [(X, T)], group_size=8, measure="kfac", curvature=obj)
    ggn = reference.dense_ggn(obj)
    W = net[0].weight
    for b in (2, 3):
        r = gptq_layer(W, 2 * X.T @ X / 64, bits=b, group_size=8, scale_dtype=W.dtype)
        v = (r.weight - W).detach().reshape(-1)
        assert g["0"].omega[b] == pytest.approx(float(0.5 * v @ ggn @ v), rel=1e-10)
        with torch.no_grad():  # and the loss rise of a linear model with squared loss is exactly
            rise = nn.functional.mse_loss(X @ r.weight.T + net[0].bias, T) - nn.functional.mse_loss(
                net(X), T
            )
            grad = torch.autograd.functional.jacobian(
                lambda w: nn.functional.mse_loss(X @ w.T + net[0].bias, T), W.detach()
            ).reshape(-1)
        assert float(rise) == pytest.approx(g["0"].omega[b] + float(grad @ v), rel=1e-9)


def test_kfac_measure_needs_a_curvature_that_covers_the_layers():
    net, X, y = _net()
    obj = hesse.Objective(net, [(X, y)], loss=nn.functional.cross_entropy)
    sens = quant.sensitivity(obj, (3,), method="kfac", quantizer=quant.Quantizer(4, "group", 8))
    with pytest.raises(ValueError, match="curvature="):
        quant.gptq_sensitivity(sens, net, [(X, y)], group_size=8, measure="kfac")
    only_first = hesse.KFACOperator(obj.restrict(["0.weight"]))
    with pytest.raises(ValueError, match="does not cover '2.weight'"):
        quant.gptq_sensitivity(
            sens, net, [(X, y)], group_size=8, measure="kfac", curvature=only_first
        )


def test_an_ekfac_curvature_gives_its_own_quadratic_form():
    net, X, y = _net()
    obj = hesse.Objective(net, [(X, y)], loss=nn.functional.cross_entropy)
    sens = quant.sensitivity(obj, (2, 3), method="kfac", quantizer=quant.Quantizer(4, "group", 8))
    E = hesse.EKFACOperator(obj.restrict(["0.weight", "2.weight"]))
    g = quant.gptq_sensitivity(sens, net, [(X, y)], group_size=8, measure="kfac", curvature=E)
    dense = E.to_dense()
    W, H = net[2].weight, 2 * torch.tanh(net[0](X)).T @ torch.tanh(net[0](X)) / 96
    for b in (2, 3):
        r = gptq_layer(W, H.detach(), bits=b, group_size=8, scale_dtype=W.dtype)
        v = (r.weight - W).detach().reshape(-1)
        block = dense[16 * 24 :, 16 * 24 :]  # the second weight's block
        assert g["2"].omega[b] == pytest.approx(float(0.5 * v @ block @ v), rel=1e-9)
