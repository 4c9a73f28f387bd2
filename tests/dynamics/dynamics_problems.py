"""Tiny float64 problems for the dynamics tests."""

import torch
from torch import nn

import hesse


def mlp(seed: int = 0, width: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3)).double()


def data(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return x, y


def objective(model=None, n: int = 24, batch: int | None = None) -> hesse.Objective:
    model = model if model is not None else mlp()
    x, y = data(n)
    size = batch or n
    batches = [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]
    return hesse.Objective(model, batches, nn.functional.mse_loss)


def dense_hessian(obj: hesse.Objective) -> torch.Tensor:
    return hesse.reference.dense_hessian(obj)


def cli_model() -> nn.Module:
    """``--model dynamics_problems:cli_model`` for the command-line tests."""
    return mlp()


def cli_data() -> list:
    """``--data dynamics_problems:cli_data``: one batch of 24 samples."""
    return [data()]
