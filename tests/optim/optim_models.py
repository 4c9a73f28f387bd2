"""Tiny seeded models and data for the optimizer and regularizer tests (float64)."""

import torch
import torch.nn.functional as F
from torch import nn

from hesse import Objective


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def conv(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).double()


def data(n: int = 12, seed: int = 0, image: bool = False):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, 1, 4, 4) if image else (n, 3)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, y


def closure(model, x, y):
    return lambda: F.cross_entropy(model(x), y)


def closure_logits(model, x, y):
    def fn():
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    return fn


def dense_hessian(model, x, y) -> torch.Tensor:
    from hesse.operators.reference import dense_hessian as ref

    return ref(Objective(model, [(x, y)], loss=F.cross_entropy))


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def params_vector(model) -> torch.Tensor:
    return flat([p.detach() for p in model.parameters()])
