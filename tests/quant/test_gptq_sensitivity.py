"""Ω of GPTQ'd layers: HAWQ-V2's Ω scaled by the GPTQ / round-to-nearest layer-error ratio."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hesse
from hesse import quant
from hesse.quant._gptq_layer import gptq_layer


def test_omega_is_scaled_by_the_measured_error_ratio_and_allocation_runs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).double()
    X = torch.randn(128, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)
    y = torch.randint(0, 4, (128,))
    grid = quant.Quantizer(4, "group", 8)
    obj = hesse.Objective(net, [(X, y)], loss=nn.functional.cross_entropy)
    sens = quant.sensitivity(obj, (2, 3, 4), quantizer=grid, budget=20, seed=0)
    g = quant.gptq_sensitivity(sens, net, [(X, y)], group_size=8)
    H = 2 * X.T @ X / 128  # the first layer's inputs (the float model's, as gptq_sensitivity)
    for b in (2, 3, 4):
        r = gptq_layer(net[0].weight, H, bits=b, group_size=8)
        assert g["0"].omega[b] == pytest.approx(
            sens["0"].omega[b] * r.error / r.rtn_error, rel=1e-12
        )
        assert g["2"].omega[b] <= sens["2"].omega[b]
    assert "GPTQ" in g.settings["omega"] and g["0"].delta_sq == sens["0"].delta_sq
    alloc = quant.allocate(g, budget=(16 * 32 + 32 * 4) * 3 / 8)
    q = quant.gptq(net, [X], bits=alloc.bits, group_size=8)
    assert {r.name: r.bits for r in quant.quantization_of(q).layers} == alloc.bits
