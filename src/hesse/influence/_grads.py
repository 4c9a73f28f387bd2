"""The per-sample gradients of influence's data: their layout, and their order by position."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..problem._per_sample import SampleGradients
from ..problem._positions import is_batch
from ..problem.objective import Objective


def check_same_layout(train: Objective, query: Objective, who: str) -> None:
    """Refuse query data whose samples are not laid out like the training samples."""
    a, b = (_layout(next(iter(obj.batches()))) for obj in (train, query))
    if a != b:
        raise ValueError(
            f"{who}: query samples have {b}, but training samples have {a}; pass query batches "
            "in the training data's layout, e.g. (x[None], y[None]) for a single sample."
        )


def _layout(batch: Any) -> str:
    """What a sample of a batch holds, in words (the shapes of one sample, or the keys)."""
    if isinstance(batch, Mapping):
        return f"the keys {sorted(batch)} (dict batches)"
    if not is_batch(batch):
        return f"a {type(batch).__name__} batch"
    x, y = batch
    inputs = (
        f"the input keys {sorted(x)}"
        if isinstance(x, Mapping)
        else f"input shape {tuple(x.shape[1:])}"
    )
    kind = "float" if y.is_floating_point() else "integer"
    return f"{inputs} and target shape {tuple(y.shape[1:])} ({kind} targets)"


def check_positions(objective: Objective, who: str, what: str) -> None:
    """Refuse data whose samples have no fixed positions (a shuffling loader), before any pass.

    Rows of the per-sample results are put in position order (:func:`in_order`), so that
    row ``i`` is sample ``i`` of the dataset, whatever order the loader yields.
    """
    try:
        objective.sample_positions(0)
    except ValueError as err:
        raise ValueError(
            f"{who}: the {what} samples are put in dataset order by their positions, and {err}"
        ) from err


def in_order(objective: Objective, parts: Sequence[SampleGradients]) -> SampleGradients:
    """The rows of the batches' results ``parts`` (data order), sorted by sample position."""
    positions = torch.cat([objective.sample_positions(i) for i in range(len(parts))])
    order = torch.argsort(positions)

    def rows(field: str) -> torch.Tensor:
        t = torch.cat([getattr(p, field) for p in parts])
        return t[order.to(t.device)]

    return SampleGradients(rows("grads"), rows("weights"), rows("losses"))
