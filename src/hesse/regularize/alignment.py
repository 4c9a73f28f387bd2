"""Hessian alignment across domains (HGP and Hutchinson variants)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..optim.estimators import rademacher
from .penalties import _grads

METHODS = ("hgp", "hutchinson")


def hessian_alignment(
    env_losses: Sequence[torch.Tensor],
    params: Iterable[torch.Tensor],
    method: str = "hgp",
    *,
    gradient_weight: float = 1.0,
    probes: int = 1,
    seed: int = 0,
) -> torch.Tensor:
    r"""How much the domains' curvatures (and gradients) differ; differentiable.

    For domains :math:`e = 1..E` with losses :math:`L_e`, gradients :math:`g_e` and Hessians
    :math:`H_e`, and bars for means over the domains:

    .. math::
        P = \frac1E \sum_e \Big( \|a_e - \bar a\|_2^2
            + \beta\, \|g_e - \bar g\|_2^2 \Big)

    with :math:`a_e = H_e g_e` for ``"hgp"`` (Hessian-gradient product, exact by double
    backward of :math:`\tfrac12\|g_e\|^2`) or :math:`a_e = \frac1n\sum_i z_i \odot H_e z_i`,
    the Hutchinson diagonal, for ``"hutchinson"`` (the same probes for every domain, so that
    their differences carry no probe noise). Both stand in for :math:`\|H_e - \bar H\|_F^2`:
    Hemati, Zhang, Estiri & Wang (2023), "Understanding Hessian Alignment for Domain
    Generalization" (their loss adds :math:`\alpha P` to the mean domain loss; their code
    detaches :math:`H_e g_e`, here it is differentiated).

    Args:
        env_losses: One scalar loss per domain (at least two), not yet differentiated.
        params: Parameters.
        method: ``"hgp"`` or ``"hutchinson"``.
        gradient_weight: :math:`\beta`.
        probes: Hutchinson probes (``"hutchinson"`` only).
        seed: Seed of the probes.

    Returns:
        A scalar tensor with its graph.

    Raises:
        ValueError: fewer than two domains or an unknown method.

    Example:
        >>> w = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
        >>> same = [(w**2).sum(), (w**2).sum()]
        >>> hessian_alignment(same, [w]).item()
        0.0
    """
    params = list(params)
    if method not in METHODS:
        raise ValueError(f"hessian_alignment: method must be one of {METHODS}, got {method!r}.")
    if probes < 1:
        raise ValueError(f"hessian_alignment: probes must be >= 1, got {probes}.")
    if len(env_losses) < 2:
        raise ValueError(
            f"hessian_alignment: needs the losses of at least two domains, got {len(env_losses)}."
        )
    grads = [_flat(_grads(loss, params)) for loss in env_losses]
    if method == "hgp":
        curv = [_flat(_hgp(g, params)) for g in grads]
    else:
        generator = torch.Generator().manual_seed(seed)
        Z = [_flat([rademacher(p, generator) for p in params]) for _ in range(probes)]
        curv = [_hutchinson(g, params, Z) for g in grads]
    return _spread(curv) + gradient_weight * _spread(grads)


def _hgp(g: torch.Tensor, params: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    r""":math:`H g` as the gradient of :math:`\tfrac12\|g\|^2`, with its graph."""
    Hg = torch.autograd.grad(0.5 * (g * g).sum(), params, create_graph=True, allow_unused=True)
    return tuple(torch.zeros_like(p) if h is None else h for p, h in zip(params, Hg, strict=True))


def _hutchinson(g: torch.Tensor, params: list[torch.Tensor], Z: list[torch.Tensor]):
    total = torch.zeros_like(g)
    for z in Z:
        Hz = torch.autograd.grad(g @ z, params, create_graph=True, allow_unused=True)
        total = total + z * _flat(
            [torch.zeros_like(p) if h is None else h for p, h in zip(params, Hz, strict=True)]
        )
    return total / len(Z)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _spread(vectors: list[torch.Tensor]) -> torch.Tensor:
    r""":math:`\frac1E \sum_e \|v_e - \bar v\|^2`."""
    V = torch.stack(vectors)
    return (V - V.mean(0)).square().sum() / len(vectors)
