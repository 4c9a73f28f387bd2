"""Small seeded models and data for the quantization tests (float64, a few hundred weights)."""

import torch
import torch.nn.functional as F
from torch import nn

from hesse import Objective
from hesse.demo import tiny_lm


def mlp(seed: int = 0) -> nn.Sequential:
    """Linear(4, 6) - tanh - Linear(6, 3), float64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()


def batches(n_batches: int = 3, size: int = 8, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 4, generator=g, dtype=torch.float64),
            torch.randint(3, (size,), generator=g),
        )
        for _ in range(n_batches)
    ]


def mlp_objective(seed: int = 0, **kwargs) -> Objective:
    return Objective(mlp(seed), batches(), F.cross_entropy, **kwargs)


def tiny_transformer(seed: int = 0) -> nn.Module:
    """The tiny-lm demo's architecture at width 8, one layer, vocabulary 7, float64."""
    torch.manual_seed(seed)
    config = tiny_lm.Config(width=8, layers=1, heads=2, context=6)
    return tiny_lm.TinyLM(7, config).double().eval()


def token_batches(n_batches: int = 2, size: int = 4, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randint(7, (size, 6), generator=g)
        y = torch.randint(7, (size, 6), generator=g)
        y[0, 4:] = tiny_lm.IGNORE
        out.append((x, y))
    return out


def transformer_objective(seed: int = 0) -> Objective:
    return Objective(tiny_transformer(seed), token_batches(), loss_fn=tiny_lm.token_loss)
