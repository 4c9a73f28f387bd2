"""How an Objective calls the model: inputs of a batch, a user loss_fn, device and dtype moves."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

Batch = Any
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, Any]]


class CallLossFn(nn.Module):
    """Lets ``functional_call`` swap parameters under a user ``loss_fn(model, batch)``."""

    def __init__(self, model: nn.Module, fn: LossFn):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch: Batch) -> tuple[torch.Tensor, Any]:
        return self.fn(self.model, batch)


def model_inputs(batch: Batch) -> Any:
    """What the model is called with: a dict batch less its ``labels``, or ``batch[0]``."""
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k != "labels"}
    return batch[0]


def call_model(model: nn.Module, batch: Batch) -> Any:
    """``model`` on a batch: a dict less ``labels`` as keywords, a tuple's first item, a tensor."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    inputs = model_inputs(batch)
    return model(**inputs) if isinstance(batch, Mapping) else model(inputs)


def cast(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``t`` on ``device``; floating tensors also in ``dtype`` (integer labels keep theirs)."""
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def move(batch: Batch, device: torch.device, dtype: torch.dtype) -> Batch:
    """Every tensor of a batch (a tensor, a dict, a list or tuple of them) through :func:`cast`."""
    if isinstance(batch, torch.Tensor):
        return cast(batch, device, dtype)
    if isinstance(batch, Mapping):
        return {k: move(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move(v, device, dtype) for v in batch)
    return batch
