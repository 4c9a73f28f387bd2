"""Landscape directions: filter-normalized Gaussian, isotropic Gaussian, Hessian eigenvectors."""

from __future__ import annotations

from typing import Any

import torch

from ..linalg import eigs
from ..operators import HessianOperator
from ..problem.objective import Objective

KINDS = ("filter", "hessian", "random")
"""Directions :func:`hesse.landscape` draws by name."""


def directions(
    obj: Objective, kind: Any, dims: int, seed: int
) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    """The ``(d, dims)`` direction matrix of a landscape, its kind, and eigenvalues if any.

    Raises:
        ValueError: an unknown kind, or user vectors of the wrong shape or count.
    """
    if isinstance(kind, str):
        if kind not in KINDS:
            raise ValueError(
                f"landscape: directions must be one of {KINDS} or a tuple of (d,) vectors, "
                f"got {kind!r}."
            )
        if kind == "hessian":
            found = eigs(HessianOperator(obj), dims, seed=seed)
            return kind, found.vectors.to(obj.dtype), found.values
        gen = torch.Generator(device="cpu").manual_seed(seed)
        draw = filter_normalized if kind == "filter" else random_unit
        return kind, torch.stack([draw(obj, gen) for _ in range(dims)], 1), None
    return "given", _given(obj, kind, dims), None


def _given(obj: Objective, vectors: Any, dims: int) -> torch.Tensor:
    """User vectors ``u`` or ``(u, v)`` as a ``(d, dims)`` matrix."""
    cols = [vectors] if isinstance(vectors, torch.Tensor) else list(vectors)
    if len(cols) != dims or any(tuple(c.shape) != (obj.dim,) for c in cols):
        shapes = [tuple(c.shape) for c in cols]
        raise ValueError(
            f"landscape: dims={dims} needs {dims} flat vector(s) of shape ({obj.dim},) (ordered "
            f"like obj.space), got shapes {shapes}."
        )
    return torch.stack([c.to(device=obj.device, dtype=obj.dtype) for c in cols], 1)


def filter_normalized(obj: Objective, gen: torch.Generator) -> torch.Tensor:
    r"""A Gaussian direction rescaled filter by filter to the norms of the weights.

    For every parameter with two or more dimensions, each filter (slice along dim 0: a conv
    output channel, a row of a linear layer or of an embedding) of a standard Gaussian draw
    :math:`d_{i}` is rescaled to the norm of the same filter of the weights,
    :math:`d_i \leftarrow d_i \|\theta_i\| / \|d_i\|`. One-dimensional parameters (biases and
    normalization weights) get 0: they are not perturbed, the ``ignore="biasbn"`` setting of
    the authors' code (Li, Xu, Taylor, Studer & Goldstein 2018, "Visualizing the loss
    landscape of neural nets", Sec. 4). Other tools normalize biases as if they were filters
    (each bias entry a "filter" of one number), which makes the direction copy the biases.

    Returns:
        ``(d,)`` flat direction in the layout of ``obj.space``.
    """
    parts = {}
    for name, theta in obj.params.items():
        if theta.dim() <= 1:
            parts[name] = torch.zeros_like(theta)
            continue
        z = torch.randn(theta.shape, generator=gen, dtype=torch.float64).to(theta)
        rows, zr = theta.reshape(len(theta), -1), z.reshape(len(z), -1)
        scale = rows.norm(dim=1, keepdim=True) / zr.norm(dim=1, keepdim=True).clamp_min(1e-30)
        parts[name] = (zr * scale).reshape(theta.shape)
    return obj.space.join(parts)


def random_unit(obj: Objective, gen: torch.Generator) -> torch.Tensor:
    """An isotropic Gaussian direction of unit norm over all analysed parameters."""
    z = torch.randn(obj.dim, generator=gen, dtype=torch.float64)
    return (z / z.norm()).to(device=obj.device, dtype=obj.dtype)
