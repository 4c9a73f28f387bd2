"""Measured loss and accuracy of a model on data: what every application reports.

The loss is :meth:`hesse.Objective.value` (the exact sample- or token-weighted mean, with
the same batch, loss and ``loss_fn`` conventions); accuracy is the share of targets whose
class is the argmax of the logits, ignoring targets of -100.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hesse.problem._calls import model_inputs
from hesse.problem._losses import logits_of
from hesse.problem.objective import Objective


@dataclass(frozen=True)
class Evaluation:
    """Loss and accuracy of a model on data.

    Attributes:
        loss: The mean loss over the data (as :class:`hesse.Objective` weights it).
        accuracy: Share of correct argmax predictions, or None when the targets are not
            class indices (regression, one-hot targets) or no target was counted.
        n: Targets counted for the accuracy (samples, or tokens for token losses); 0 when
            ``accuracy`` is None.
    """

    loss: float
    accuracy: float | None
    n: int


def evaluate(
    model: nn.Module, data: Any, loss: Callable | None = None, *, loss_fn: Callable | None = None
) -> Evaluation:
    """The loss and accuracy of ``model`` on ``data``, without changing the model.

    Args:
        model: A model in eval mode (dropout off), as :class:`hesse.Objective` needs.
        data: Batches as :class:`hesse.Objective` takes them (tuples, dicts, a loader).
        loss: ``loss(outputs, targets)``, or None for a Hugging Face model's own loss.
        loss_fn: ``loss_fn(model, batch) -> (mean_loss, weight)`` instead of ``loss``; the
            accuracy then reads ``model(batch[0])`` against ``batch[1]``.

    Returns:
        An :class:`Evaluation`.

    Example:
        >>> model = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.eye(2))
        >>> x, y = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
        >>> evaluate(model, [(x, y)], torch.nn.functional.cross_entropy).accuracy
        0.5
    """
    obj = Objective(model, data, loss, loss_fn=loss_fn)
    correct = counted = 0
    with torch.no_grad():
        for batch in obj.batches():
            if loss_fn is None:
                out, y = obj.outputs(obj.params, batch), obj.targets(batch)
            else:
                out, y = logits_of(model(model_inputs(batch))), batch[1]
            hits = _hits(out, y)
            if hits is None:
                return Evaluation(obj.value().item(), None, 0)
            correct, counted = correct + hits[0], counted + hits[1]
    accuracy = correct / counted if counted else None
    return Evaluation(obj.value().item(), accuracy, counted if counted else 0)


def _hits(out: torch.Tensor, y: torch.Tensor) -> tuple[int, int] | None:
    """(correct, counted) targets of one batch, or None when ``y`` holds no class indices."""
    if y.dtype.is_floating_point or y.dtype == torch.bool or out.dim() != y.dim() + 1:
        return None
    if out.shape[:-1] == y.shape:
        pred = out.argmax(-1)
    elif out.shape[:1] + out.shape[2:] == y.shape:
        pred = out.argmax(1)  # (N, C, ...) logits, the layout of F.cross_entropy
    else:
        return None
    keep = y != -100
    return int((pred[keep] == y[keep]).sum()), int(keep.sum())
