"""Helpers shared by the dynamics modules: eval mode for a measurement, all data in one batch."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode for the block, then give each back its own mode.

    A training loop leaves dropout and batch-norm in training mode; curvature is measured on
    the deterministic eval-mode loss (running batch-norm statistics, no dropout), and the
    loop's modes must come back exactly as they were, module by module.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def one_batch(batches: list, who: str) -> Any:
    """One batch holding every sample of ``batches`` (tensors concatenated on dim 0).

    Args:
        batches: The objective's batches: tensors, or tuples, lists or dicts of them.
        who: The calling function, for the error message.
    """
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches)
    if isinstance(first, Mapping):
        return {key: one_batch([b[key] for b in batches], who) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(one_batch([b[i] for b in batches], who) for i in range(len(first)))
    raise ValueError(
        f"{who}: batches must hold tensors (tuples, lists or dicts of them) to be redrawn, got "
        f"{type(first).__name__}."
    )
