"""What a demo is (:class:`Demo`) and how its samples are split and batched."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


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


@dataclass(frozen=True)
class Demo:
    """A trained demo model with its training data.

    Attributes:
        name: the demo's name (a key of ``DEMOS``).
        model: the trained model, in eval mode.
        inputs: all training inputs, stacked (first dimension = samples).
        targets: all training targets, stacked.
        test_inputs: the held-out inputs (``load_demo(..., holdout=)``; empty when none).
        test_targets: the held-out targets.
        loss: ``loss(outputs, targets)`` for tuple batches, or None when ``loss_fn`` is used.
        loss_fn: ``loss_fn(model, batch) -> (mean_loss, weight)``, or None.
        lr: the learning rate the model was trained with (plain SGD, no momentum).
        n_classes: number of classes (vocabulary size for the language model).
        description: one paragraph for the report.
        training: how training went: configuration, epochs or steps, final loss, cache file.
        batch_size: default batch size for the analysis data passes.
        defaults: analysis settings that keep this demo fast (``samples``, ``k``, ``budget``,
            ``steps``, ``probes``); the CLI uses them unless told otherwise.
    """

    name: str
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    test_inputs: torch.Tensor
    test_targets: torch.Tensor
    loss: Callable | None
    loss_fn: Callable | None
    lr: float
    n_classes: int
    description: str
    training: dict = field(default_factory=dict)
    batch_size: int = 256
    defaults: dict = field(default_factory=dict)

    def batches(self, *, samples: int | None = None, batch_size: int | None = None) -> list:
        """The first ``samples`` training samples as a list of ``(inputs, targets)`` batches.

        Args:
            samples: number of samples (all when None).
            batch_size: samples per batch (``self.batch_size`` when None).

        Returns:
            A list of ``(inputs, targets)`` tuples; the last one may be smaller.
        """
        n = len(self.inputs) if samples is None else min(samples, len(self.inputs))
        return _batches(self.inputs[:n], self.targets[:n], batch_size or self.batch_size)

    def test_batches(self, *, batch_size: int | None = None) -> list:
        """The held-out samples as a list of ``(inputs, targets)`` batches.

        Raises:
            ValueError: the demo was loaded without ``holdout``.
        """
        if not len(self.test_inputs):
            raise ValueError(
                f"Demo {self.name!r}: no held-out samples; load it with "
                f"load_demo({self.name!r}, holdout=0.2)."
            )
        return _batches(self.test_inputs, self.test_targets, batch_size or self.batch_size)


def _batches(inputs: torch.Tensor, targets: torch.Tensor, size: int) -> list:
    ends = [(i, min(i + size, len(inputs))) for i in range(0, len(inputs), size)]
    return [(inputs[a:b], targets[a:b]) for a, b in ends]
