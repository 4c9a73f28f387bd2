"""The built-in demos (see ``hesse.demo``): one module per demo."""

from __future__ import annotations

import torch


def split(n: int, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the training part and of the held-out part of ``n`` samples.

    ``round(holdout * n)`` samples, drawn by a generator seeded with ``seed``, are held out;
    with ``holdout == 0`` every sample trains (in order) and the held-out part is empty.
    """
    if not 0 <= holdout < 1:
        raise ValueError(
            f"demo: holdout must be a fraction in [0, 1), got {holdout}; e.g. holdout=0.2 keeps "
            "a fifth of the samples out of training."
        )
    if holdout == 0:
        return torch.arange(n), torch.arange(0)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = round(holdout * n)
    return order[n_test:].sort().values, order[:n_test].sort().values
