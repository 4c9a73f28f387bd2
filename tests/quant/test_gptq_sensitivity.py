"""Ω of GPTQ'd layers: HAWQ-V2's Ω scaled by GPTQ / round-to-nearest error, or measured."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hesse
from hesse import quant
from hesse.quant._gptq_layer import gptq_layer


def _setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).double()
    X = torch.randn(128, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)
    y = torch.randint(0, 4, (128,))
    grid = quant.Quantizer(4, "group", 8)
    obj = hesse.Objective(net, [(X, y)], loss=nn.functional.cross_entropy)
    sens = quant.sensitivity(obj, (2, 3, 4), quantizer=grid, budget=20, seed=0)
    return net, X, y, grid, sens


@pytest.mark.parametrize("full", [True, False])
def test_omega_is_scaled_by_the_measured_error_ratio_and_allocation_runs(full):
    net, X, y, grid, sens = _setup()
    g = quant.gptq_sensitivity(sens, net, [(X, y)], group_size=8, full_range=full)
    H = 2 * X.T @ X / 128  # the first layer's inputs (the float model's, as gptq_sensitivity)
    W = net[0].weight
    for b in (2, 3, 4):
        r = gptq_layer(W, H, bits=b, group_size=8, scale_dtype=W.dtype, full_range=full)
        D = (W - grid.fake(W, b)).detach()  # RTN on the grid of sens' Ω (the narrow one)
        rtn = float(torch.einsum("ri,ij,rj->", D, H, D))
        assert rtn == pytest.approx(r.rtn_error, rel=1e-12) or full
        assert g["0"].omega[b] == pytest.approx(sens["0"].omega[b] * r.error / rtn, rel=1e-12)
        assert g["2"].omega[b] <= sens["2"].omega[b]
    assert "GPTQ" in g.settings["omega"] and g["0"].delta_sq == sens["0"].delta_sq
    alloc = quant.allocate(g, budget=(16 * 32 + 32 * 4) * 3 / 8)
    q = quant.gptq(net, [X], bits=alloc.bits, group_size=8, full_range=full)
    assert {r.name: r.bits for r in quant.quantization_of(q).layers} == alloc.bits


def test_measured_omega_is_the_loss_rise_of_the_layer_alone():
    net, X, y, grid, sens = _setup()
    before = [p.detach().clone() for p in net.parameters()]
    ce = nn.functional.cross_entropy
    g = quant.gptq_sensitivity(sens, net, [(X, y)], group_size=8, measure="loss", loss=ce)
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters(), strict=True))
    base = float(ce(net(X), y).detach())
    H = 2 * X.T @ X / 128
    for b in (2, 3, 4):
        q = gptq(net, "0", b, H)
        rise = float(ce(q(X), y).detach()) - base
        assert g["0"].omega[b] == pytest.approx(max(rise, 0.0), rel=1e-9)
    assert g["0"].omega[2] > g["0"].omega[3] > 0  # a real rise, not the clamp at 0
    assert g.settings["omega"].startswith("measured") and g["2"].delta_sq == sens["2"].delta_sq
    with pytest.raises(ValueError, match="measure"):
        quant.gptq_sensitivity(sens, net, [(X, y)], measure="trace")


def gptq(net, name, bits, H):
    """``net`` with layer ``name`` alone replaced by its GPTQ weight (float64 Hessian ``H``)."""
    q = copy.deepcopy(net)
    W = dict(q.named_modules())[name].weight
    r = gptq_layer(W, H, bits=bits, group_size=8, scale_dtype=W.dtype)
    with torch.no_grad():
        W.copy_(r.weight)
    return q
