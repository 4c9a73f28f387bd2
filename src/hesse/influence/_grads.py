"""Per-sample gradients and losses of an Objective, one batch at a time (``vmap`` of ``grad``)."""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Mapping as MappingType

import torch
from torch.func import grad, vmap

from ..objective import Objective


def _pair(batch, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(inputs, targets)`` tensors of a batch, or an error that says what is supported."""
    ok = (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and all(isinstance(t, torch.Tensor) for t in batch)
    )
    if not ok:
        kind = "a dict" if isinstance(batch, MappingType) else type(batch).__name__
        raise ValueError(
            f"{who}: per-sample gradients need (inputs, targets) batches of tensors, got {kind}; "
            "pass a list of (x, y) tuples or a DataLoader that yields them."
        )
    return batch[0], batch[1]


def sample_gradients(
    objective: Objective, who: str = "influence"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    r"""Yield ``(G_b, l_b)`` per batch: per-sample gradients ``(n_b, d)`` and losses ``(n_b,)``.

    The loss of sample :math:`i` is ``loss(model(x_i[None]), y_i[None])`` with the objective's
    loss, so the objective's value is the mean of these when its loss is a plain mean
    (:math:`L = \frac1n\sum_i \ell_i`). One ``torch.func.vmap`` of ``grad`` per batch: memory
    grows with the batch size times ``d``.

    Raises:
        ValueError: batches that are not ``(inputs, targets)`` tensors, or an objective built
            with ``loss_fn=``.
    """
    if objective.loss_fn is not None or objective.loss is None:
        raise ValueError(
            f"{who}: per-sample gradients need loss=(outputs, targets) -> mean loss, not "
            "loss_fn= or a model's own loss."
        )
    params = {n: p.detach() for n, p in objective.params.items()}

    def one(p: dict, x: torch.Tensor, y: torch.Tensor):
        value = objective.loss(objective.outputs(p, (x[None], y[None])), y[None])
        return value, value.detach()

    per_sample = vmap(grad(one, has_aux=True), in_dims=(None, 0, 0))
    for batch in objective.batches():
        x, y = _pair(batch, who)
        grads, losses = per_sample(params, x, y)
        yield objective.space.join(grads).T, losses


def sample_shape(objective: Objective, who: str) -> tuple[tuple, tuple, bool]:
    """Per-sample input shape, target shape and whether targets are floating, of batch 0."""
    x, y = _pair(next(iter(objective.batches())), who)
    return tuple(x.shape[1:]), tuple(y.shape[1:]), y.is_floating_point()


def check_same_layout(train: Objective, query: Objective, who: str) -> None:
    """Refuse query data whose samples are not shaped like the training samples."""
    a, b = sample_shape(train, who), sample_shape(query, who)
    if a != b:
        raise ValueError(
            f"{who}: query samples have input shape {b[0]} and target shape {b[1]} "
            f"({'float' if b[2] else 'integer'} targets), but training samples have {a[0]} and "
            f"{a[1]} ({'float' if a[2] else 'integer'}); pass query batches in the training "
            "data's layout, e.g. (x[None], y[None]) for a single sample."
        )
