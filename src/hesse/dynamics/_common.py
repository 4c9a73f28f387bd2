"""Helpers shared by the dynamics modules: the curvature operator of a name, eval mode."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..objective import Objective
from ..operators import FisherOperator, GGNOperator, HessianOperator, Operator

CURVATURES = ("hessian", "ggn", "fisher")
"""Curvature matrices the dynamics tools accept by name."""


def curvature_operator(obj: Objective, curvature: str) -> Operator:
    """The operator of ``obj`` named ``curvature`` (``"hessian"``, ``"ggn"`` or ``"fisher"``).

    Raises:
        ValueError: an unknown name.
    """
    if curvature == "hessian":
        return HessianOperator(obj)
    if curvature == "ggn":
        return GGNOperator(obj)
    if curvature == "fisher":
        return FisherOperator(obj)
    raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}.")


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
