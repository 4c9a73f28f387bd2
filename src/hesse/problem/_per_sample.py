r"""Per-sample gradients of an Objective: the gradient of each sample's term of its sum.

An :class:`~hesse.Objective` is :math:`L = \frac1W \sum_i s_i` with sample :math:`i`'s term
:math:`s_i = w_i \ell_i`: :math:`\ell_i` is the mean loss of that sample alone and :math:`w_i`
what that mean is over (1 per sample; its counted tokens under ``ignore_index``; the sum of
its class weights; ``loss_fn``'s weight), :math:`W = \sum_i w_i`. A sample whose targets are
all ignored has :math:`w_i = 0`, no term and :math:`\ell_i` taken as 0. The rows here are
:math:`\nabla s_i`, so that :math:`\frac1W \sum_i \nabla s_i = \nabla L` and dropping sample
:math:`i` from the objective drops :math:`\nabla s_i / W` from its gradient.

Two ways to the same numbers: one ``torch.func.vmap`` of ``grad`` per batch (the fast path,
for a loss of the model outputs and batches of tensors), or one backward pass per sample
through :meth:`Objective.batch_loss` (any model and batch: dict batches, a model's own loss,
``loss_fn=``). ``how="auto"`` tries the first and falls back to the second where ``vmap``
cannot run the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import grad, vmap

from ._positions import rows_of, samples_in
from .objective import Objective

HOW = ("auto", "vmap", "loop")


@dataclass(frozen=True)
class SampleGradients:
    r"""The per-sample (or per-chunk) gradients of one batch.

    Attributes:
        grads: ``(n_b, d)`` :math:`\nabla s_i` in the layout of ``objective.space``.
        weights: ``(n_b,)`` float64 :math:`w_i`.
        losses: ``(n_b,)`` :math:`\ell_i`, each row's own mean loss (0 where :math:`w_i = 0`).
    """

    grads: torch.Tensor
    weights: torch.Tensor
    losses: torch.Tensor

    def means(self) -> torch.Tensor:
        r"""``(n_b, d)`` gradients of each row's own mean loss: :math:`\nabla s_i / w_i`, or 0."""
        w = self.weights.to(self.grads)
        return self.grads / torch.where(w > 0, w, 1.0)[:, None]


def sample_gradients(objective: Objective, *, how: str = "auto") -> Iterator[SampleGradients]:
    """Yield the per-sample gradients of each batch of the objective's data, in data order.

    Args:
        objective: The objective; its analysed parameters are the columns.
        how: ``"auto"``, ``"vmap"`` or ``"loop"`` (see :func:`batch_gradients`).
    """
    for batch in objective.batches():
        yield batch_gradients(objective, batch, how=how)


def batch_gradients(
    objective: Objective, batch: Any, *, size: int = 1, how: str = "auto"
) -> SampleGradients:
    """Gradients of the terms of chunks of ``size`` consecutive samples of one batch.

    Args:
        objective: The objective.
        batch: A batch as ``objective.batches()`` yields it.
        size: Samples per row (1: per-sample gradients); the last row may hold fewer.
        how: ``"vmap"`` (one ``torch.func.vmap`` of ``grad``; ``size`` 1, a loss of the model
            outputs and batches whose items are all tensors), ``"loop"`` (one backward pass
            per row), or ``"auto"``: ``vmap`` where it applies and runs, else the loop.

    Returns:
        SampleGradients with one row per chunk.

    Raises:
        ValueError: an unknown ``how``, ``how="vmap"`` where it does not apply, or a batch
            holding no tensor to count samples by.
    """
    if how not in HOW:
        raise ValueError(f"per-sample gradients: how must be one of {HOW}, got {how!r}.")
    if how == "loop" or size != 1:
        return _looped(objective, batch, size)
    if not _vmappable(objective, batch):
        if how == "vmap":
            raise ValueError(
                "per-sample gradients: how='vmap' needs a loss of the model outputs (loss=, or "
                "one inferred for a Hugging Face model) and batches whose items are all tensors "
                "with a batch dimension; pass how='loop' (or 'auto')."
            )
        return _looped(objective, batch, size)
    try:
        return _vmapped(objective, batch)
    except RuntimeError:
        if how == "vmap":
            raise
        # vmap cannot run data-dependent control flow (Hugging Face models build their
        # attention masks with it); the loop runs any model, and raises any real error again
        return _looped(objective, batch, size)


def sample_weights(objective: Objective, batch: Any) -> torch.Tensor:
    """``(n_b,)`` float64 weights :math:`w_i` of the samples of a batch (module docstring).

    Raises:
        ValueError: an objective built with ``loss_fn=`` (its weights come with its losses:
            use :func:`batch_gradients`), or a batch holding no tensor to count samples by.
    """
    if objective.loss_fn is not None:
        raise ValueError(
            "sample_weights: a loss_fn= objective gives its weights with its losses; use "
            "batch_gradients (its SampleGradients.weights)."
        )
    n = samples_in(batch, "per-sample gradients")
    rows = (rows_of(batch, slice(i, i + 1)) for i in range(n))
    return torch.tensor([objective.batch_weight(r) for r in rows], dtype=torch.float64)


def data_weight(objective: Objective) -> float:
    r""":math:`W`, the total weight of the objective's data (what its mean loss is over)."""
    if objective.loss_fn is None:
        return sum(objective.batch_weight(b) for b in objective.batches())
    with torch.no_grad():
        return sum(objective.batch_loss(objective.params, b)[1] for b in objective.batches())


def _vmappable(objective: Objective, batch: Any) -> bool:
    """Whether the objective exposes outputs and every item of the batch is a batched tensor."""
    return objective.loss_fn is None and objective.loss is not None and _all_batched(batch)


def _all_batched(batch: Any) -> bool:
    if isinstance(batch, torch.Tensor):
        return batch.dim() > 0
    items = batch.values() if isinstance(batch, Mapping) else batch
    return isinstance(batch, (Mapping, list, tuple)) and all(map(_all_batched, items))


def _vmapped(objective: Objective, batch: Any) -> SampleGradients:
    """All rows of a batch by one ``vmap`` of ``grad``; rows of weight 0 stay 0."""
    w = sample_weights(objective, batch)
    n, d = w.shape[0], objective.dim
    grads = torch.zeros(n, d, dtype=objective.dtype, device=objective.device)
    losses = torch.zeros(n, dtype=objective.dtype, device=objective.device)
    kept = torch.nonzero(w > 0).flatten()  # the mean over no target is 0/0: leave those out
    if kept.numel() == 0:
        return SampleGradients(grads, w, losses)
    params = {name: p.detach() for name, p in objective.params.items()}

    def term(p: dict, sample: Any, weight: torch.Tensor):
        mean = objective.output_loss(objective.outputs(p, sample), objective.targets(sample), 1.0)
        return weight * mean, mean.detach()

    # each sample keeps a batch dimension of 1, as the model and the loss expect
    rows = _unsqueezed(rows_of(batch, kept))
    weights = w[kept].to(device=objective.device, dtype=objective.dtype)
    G, means = vmap(grad(term, has_aux=True), in_dims=(None, 0, 0))(params, rows, weights)
    grads[kept.to(grads.device)] = objective.space.join(G).T
    losses[kept.to(losses.device)] = means
    return SampleGradients(grads, w, losses)


def _unsqueezed(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.unsqueeze(1)
    if isinstance(batch, Mapping):
        return {key: _unsqueezed(value) for key, value in batch.items()}
    return type(batch)(_unsqueezed(value) for value in batch)


def _looped(objective: Objective, batch: Any, size: int) -> SampleGradients:
    """One backward pass per chunk of ``size`` samples, through ``Objective.batch_loss``."""
    n = samples_in(batch, "per-sample gradients")
    chunks = (rows_of(batch, slice(s, min(s + size, n))) for s in range(0, n, size))
    grads, weights, losses = zip(*(_term_gradient(objective, c) for c in chunks), strict=True)
    w = torch.tensor(weights, dtype=torch.float64)
    return SampleGradients(torch.stack(grads), w, torch.stack(losses))


def _term_gradient(objective: Objective, batch: Any) -> tuple[torch.Tensor, float, torch.Tensor]:
    """The flat gradient of a batch's term ``w * mean``, its weight ``w`` and its mean (or 0)."""
    params = {name: p.detach().requires_grad_(True) for name, p in objective.params.items()}
    with torch.enable_grad():
        value, w = objective.batch_loss(params, batch)
        g = torch.autograd.grad(
            value, list(params.values()), allow_unused=True, materialize_grads=True
        )
    mean = value.detach() / w if w else value.detach()
    return objective.space.join(dict(zip(params, g, strict=True))), w, mean
