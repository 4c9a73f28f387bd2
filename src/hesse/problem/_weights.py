"""Which axis of a weight holds its output units, and the weight seen as (outputs, inputs) rows.

Per-output-channel grids, ``n:m`` groups along the reduction dimension and layer-wise OBS all
need to know, for each module, which axis of its weight indexes the outputs. It is not always
axis 0: Hugging Face's ``Conv1D`` (GPT-2) stores its weight as ``(in, out)``, and a transposed
convolution as ``(in, out/groups, *kernel)``.
"""

from __future__ import annotations

import torch
from torch import nn

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def is_hf_conv1d(module: nn.Module | None) -> bool:
    """True for Hugging Face's ``Conv1D`` (a linear layer whose weight is stored ``(in, out)``)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def output_axis(module: nn.Module | None, weight: torch.Tensor) -> int:
    """The axis of ``weight`` (a parameter of ``module``) that indexes the module's outputs.

    ``Linear``, ``ConvNd``, ``Embedding`` (one row per token, the rows a tied LM head
    produces) and any other matrix: 0. Hugging Face ``Conv1D`` and ``ConvTransposeNd``: 1.
    A 1-d weight has one axis: 0.

    Args:
        module: The module that owns ``weight`` directly (None: a bare parameter).
        weight: The weight tensor.
    """
    if weight.dim() >= 2 and (is_hf_conv1d(module) or isinstance(module, _TRANSPOSED)):
        return 1
    return 0


def as_rows(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """``weight`` as a ``(outputs, inputs)`` matrix: one row per output unit.

    The inputs of a row are the remaining axes flattened in their order (a conv kernel's
    ``(in, *kernel)``), so consecutive entries of a row run along the reduction dimension.

    Args:
        weight: Tensor of any shape with at least one axis.
        axis: The output axis (see :func:`output_axis`).

    Example:
        >>> W = torch.arange(6.0).reshape(2, 3)  # HF Conv1D: 2 inputs, 3 outputs
        >>> as_rows(W, 1)
        tensor([[0., 3.],
                [1., 4.],
                [2., 5.]])
    """
    return weight.movedim(axis, 0).reshape(weight.shape[axis], -1)


def from_rows(rows: torch.Tensor, shape: torch.Size | tuple[int, ...], axis: int) -> torch.Tensor:
    """Inverse of :func:`as_rows`: the ``(outputs, inputs)`` matrix back in ``shape``.

    Example:
        >>> W = torch.randn(2, 3, 4)
        >>> torch.equal(from_rows(as_rows(W, 1), W.shape, 1), W)
        True
    """
    moved = (shape[axis], *shape[:axis], *shape[axis + 1 :])
    return rows.reshape(moved).movedim(0, axis)
