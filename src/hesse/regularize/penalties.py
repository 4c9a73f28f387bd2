"""Differentiable curvature penalties: the Hutchinson trace of the Hessian, the gradient norm."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch

from ..optim.estimators import rademacher


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``d loss / d params`` with the graph kept (zeros for parameters not reached)."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise ValueError(
            "expected the loss as a scalar tensor that depends on the parameters (computed with "
            f"gradients enabled, not yet differentiated); got {type(loss).__name__}"
            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
            + "."
        )
    g = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    return tuple(torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g, strict=True))


def _total(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum(terms)`` of one term per parameter: a tensor, as ``_grads`` refuses no parameters."""
    return cast(torch.Tensor, sum(terms))


def hessian_trace(
    loss: torch.Tensor, params: Iterable[torch.Tensor], probes: int = 1, *, seed: int = 0
) -> torch.Tensor:
    r"""Hutchinson's estimate of :math:`\mathrm{tr}(\nabla^2 L)`, differentiable in the parameters.

    .. math:: \widehat{\mathrm{tr}} = \frac1n \sum_{i=1}^n z_i^\top \nabla^2 L\, z_i

    with Rademacher :math:`z_i` from ``seed``: unbiased for the trace, and for a fixed seed a
    smooth function of the parameters whose gradient (a third-derivative product, by one more
    backward) is exact. Add ``c * hessian_trace(loss, params)`` to the loss to penalize
    sharpness (Hutchinson 1989; as a regularizer e.g. Liu et al. 2023, "Enhance Diffusion to
    Improve Robust Generalization"; Sankar et al. 2021, "A Deeper Look at the Hessian
    Eigenspectrum of Deep Neural Networks and its Applications to Regularization").

    Args:
        loss: Scalar loss, not yet differentiated.
        params: Parameters (an iterable of tensors).
        probes: Number :math:`n` of probes (one double-backward each).
        seed: Seed of the probes; use a new one per step.

    Returns:
        A scalar tensor with its graph.

    Raises:
        ValueError: a loss that is not a scalar depending on the parameters, or ``probes < 1``.

    Example:
        >>> w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> loss = (w**3).sum()  # Hessian diag(6 w), trace 18
        >>> hessian_trace(loss, [w], probes=3).item()
        18.0
    """
    params = list(params)
    if probes < 1:
        raise ValueError(f"hessian_trace: probes must be >= 1, got {probes}.")
    grads = _grads(loss, params)
    generator = torch.Generator().manual_seed(seed)
    total = loss.new_zeros(())
    for _ in range(probes):
        z = [rademacher(p, generator) for p in params]
        gz = _total((g * zi).sum() for g, zi in zip(grads, z, strict=True))
        Hz = torch.autograd.grad(gz, params, create_graph=True, allow_unused=True)
        total = total + sum((zi * h).sum() for zi, h in zip(z, Hz, strict=True) if h is not None)
    return total / probes


def gradient_norm(
    loss: torch.Tensor, params: Iterable[torch.Tensor], *, squared: bool = False
) -> torch.Tensor:
    r""":math:`\|\nabla L\|_2` (or its square), differentiable in the parameters.

    Its gradient is :math:`\nabla^2 L\, \nabla L / \|\nabla L\|`: penalizing it pushes toward
    flat regions (Zhao, Zhang & Hu 2022, "Penalizing Gradient Norm for Efficiently Improving
    Generalization in Deep Learning"; its first-order surrogate is SAM's).

    Args:
        loss: Scalar loss, not yet differentiated.
        params: Parameters.
        squared: Return :math:`\|\nabla L\|^2` (smooth at a stationary point).

    Returns:
        A scalar tensor with its graph.

    Example:
        >>> w = torch.tensor([3.0, 4.0], requires_grad=True)
        >>> gradient_norm((w**2).sum() / 2, [w]).item()
        5.0
    """
    square = _total((g * g).sum() for g in _grads(loss, list(params)))
    return square if squared else square.sqrt()
