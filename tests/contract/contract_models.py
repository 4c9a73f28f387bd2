"""Tiny float64 models, data and dense references shared by the optimizer contract tests."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

DT = torch.float64


def _mlp(seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4, bias=bias), nn.Tanh(), nn.Linear(4, 2, bias=bias)).to(DT)


def _data(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, 2, (n,), generator=g)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _unflat(model, theta):
    out, i = {}, 0
    for name, p in model.named_parameters():
        out[name] = theta[i : i + p.numel()].view_as(p)
        i += p.numel()
    return out


def _dense_hessian(model, x, y):
    def f(theta):
        return F.cross_entropy(functional_call(model, _unflat(model, theta), (x,)), y)

    return hessian(f)(_flat(model))


def _z(diff, se):
    return (diff.abs() / se.clamp_min(1e-12)).max().item()


def _ce(model, x, y):
    return F.cross_entropy(model(x), y)
