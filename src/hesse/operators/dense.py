"""Dense matrices as operators, and the structure (symmetric, PSD) read off a dense matrix."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .base import PSD, SYMMETRIC, Operator


class DenseOperator(Operator):
    """A dense matrix as an operator.

    Args:
        matrix: ``(d, d)`` tensor.
        tags: Declared structure; by default ``"symmetric"`` when the matrix is symmetric and
            ``"psd"`` when, in addition, its smallest eigenvalue is not below round-off.
        space: Optional parameter layout, which enables ``restrict`` and ``blocks``.
    """

    def __init__(self, matrix: torch.Tensor, *, tags: Iterable[str] | None = None, space=None):
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"DenseOperator: expected a square matrix, got {tuple(matrix.shape)}.")
        if space is not None and space.dim != matrix.shape[0]:
            raise ValueError(
                f"DenseOperator: space has {space.dim} entries, matrix {matrix.shape[0]}."
            )
        super().__init__(
            matrix.shape[0],
            matrix.dtype,
            matrix.device,
            infer_tags(matrix) if tags is None else tags,
            space,
        )
        self.matrix = matrix

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.matrix @ V

    def _restrict(self, names: list[str]) -> Operator:
        space = self._layout()
        slices = space.slices()
        idx = torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in names])
        idx = idx.to(self.matrix.device)
        return DenseOperator(self.matrix[idx][:, idx], tags=self.tags, space=space.subspace(names))

    def _transpose(self) -> Operator:
        return DenseOperator(self.matrix.T, tags=self.tags, space=self.space)


def infer_tags(matrix: torch.Tensor) -> frozenset[str]:
    """Structure of a dense matrix: symmetric, and PSD up to round-off."""
    scale = matrix.abs().max().clamp_min(torch.finfo(matrix.dtype).tiny)
    eps = 100 * torch.finfo(matrix.dtype).eps * matrix.shape[0]
    if (matrix - matrix.T).abs().max() > eps * scale:
        return frozenset()
    if torch.linalg.eigvalsh(matrix).min() >= -eps * scale:
        return frozenset({SYMMETRIC, PSD})
    return frozenset({SYMMETRIC})
