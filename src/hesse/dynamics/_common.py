"""Helpers shared by the dynamics modules: eval mode for a measurement."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
