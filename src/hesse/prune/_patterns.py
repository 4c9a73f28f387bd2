"""Sparsity patterns: checks of the sparsity and ``"n:m"`` masks (keep n of every m).

The ``m`` consecutive weights of a group run along the reduction dimension of one output
unit: a row of :func:`hesse.problem._weights.as_rows`, whose output axis is not always 0
(Hugging Face ``Conv1D`` stores its weight ``(in, out)``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ..problem._weights import as_rows, from_rows, output_axis

_NM = re.compile(r"^(\d+):(\d+)$")


def check_sparsity(sparsity: float, who: str) -> None:
    """Raise unless ``0 <= sparsity < 1``."""
    if not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1):
        raise ValueError(
            f"{who}: sparsity must be a fraction in [0, 1) (0.5 zeroes half the weights), "
            f"got {sparsity!r}."
        )


def parse_pattern(
    pattern: str | None, sparsity: float | None, row: int | None, who: str
) -> tuple[int | None, int | None]:
    """``(n, m)`` of an ``"n:m"`` pattern, or ``(None, None)`` for unstructured sparsity.

    Args:
        pattern: ``"n:m"`` or None.
        sparsity: The requested sparsity: with a pattern None or :math:`1 - n/m`.
        row: Row length the groups of ``m`` must divide (None: not checked).
        who: Name for the error messages.

    Raises:
        ValueError: a malformed pattern, a sparsity outside [0, 1) or other than the pattern's,
            or a row length that ``m`` does not divide.
    """
    if pattern is None:
        if sparsity is None:
            raise ValueError(f"{who}: pass sparsity= (a fraction in [0, 1)) or pattern='n:m'.")
        check_sparsity(sparsity, who)
        return None, None
    match = _NM.match(pattern)
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise ValueError(
            f"{who}: pattern must be 'n:m' with 0 < n < m (keep n of every m consecutive "
            f"weights of a row, e.g. '2:4'), got {pattern!r}."
        )
    n, m = int(match[1]), int(match[2])
    if sparsity is not None and abs(sparsity - (1 - n / m)) > 1e-9:
        raise ValueError(
            f"{who}: pattern {pattern!r} has sparsity {1 - n / m:g}, but sparsity={sparsity} "
            "was asked for; pass sparsity=None or the pattern's own."
        )
    if row is not None and row % m:
        raise ValueError(
            f"{who}: pattern {pattern!r} needs rows whose length is a multiple of {m}, but a "
            f"row has {row} weights; prune this weight unstructured or leave it out (params=)."
        )
    return n, m


def group_mask(score: torch.Tensor, keep: int, m: int) -> torch.Tensor:
    """Bool mask keeping the ``keep`` largest scores of every ``m`` consecutive ones of a row.

    Args:
        score: ``(rows, cols)`` with ``cols`` a multiple of ``m``.
        keep: Weights kept per group.
        m: Group size.

    Example:
        >>> group_mask(torch.tensor([[4.0, 1.0, 3.0, 2.0]]), 2, 4)
        tensor([[ True, False,  True, False]])
    """
    groups = score.reshape(score.shape[0], -1, m)
    top = groups.topk(keep, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(score.shape)


def output_axes(model: nn.Module, params: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The output axis of each named parameter, from the module that owns it."""
    return {
        name: output_axis(model.get_submodule(name.rpartition(".")[0]), p)
        for name, p in params.items()
    }


def row_length(shape: torch.Size, axis: int) -> int:
    """Weights per output unit: the length of a row that ``n:m`` groups must divide."""
    return shape.numel() // shape[axis] if shape else 1


def nm_masks(
    scores: Mapping[str, torch.Tensor], axes: Mapping[str, int], keep: int, m: int
) -> dict[str, torch.Tensor]:
    """:func:`group_mask` of each named score tensor, its groups along the rows of ``axes``."""
    return {
        name: from_rows(group_mask(as_rows(s, axes[name]), keep, m), s.shape, axes[name])
        for name, s in scores.items()
    }
