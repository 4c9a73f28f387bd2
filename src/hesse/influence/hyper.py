r"""Hypergradients by the implicit function theorem: d(validation loss) / d(regularization).

For an inner problem :math:`\hat\theta(h) = \arg\min_\theta J(\theta, h)` with
:math:`J(\theta, h) = L_{in}(\theta) + P(\theta, h)` and an outer loss :math:`L_{out}(\theta)`,

.. math::
    \frac{d L_{out}(\hat\theta(h))}{d h}
    = -\Big(\partial_h \nabla_\theta P(\hat\theta, h)\Big)^\top
      \big(\nabla^2_\theta J(\hat\theta, h)\big)^{-1} \nabla_\theta L_{out}(\hat\theta),

because :math:`\nabla_\theta J(\hat\theta(h), h) = 0` for every :math:`h` (Bengio 2000,
"Gradient-based optimization of hyperparameters"; Pedregosa 2016, "Hyperparameter
optimization with approximate gradient"; Lorraine, Vicol & Duvenaud 2020, "Optimizing
millions of hyperparameters by implicit differentiation"). The default penalty is weight
decay :math:`P = \frac12 \sum_j c_j(h)\,\theta_j^2` with one decay for all parameters, one
per parameter tensor, or one per coordinate; its mixed derivative is
:math:`\partial_{c_j} \nabla_{\theta_j} P = \theta_j`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch.func import grad, jvp, vmap

from ..operators import CURVATURES, PSD, SYMMETRIC, Operator, curvature_operator
from ..problem.objective import Objective
from ..problem.params import ParamSpace
from ._ihvp import InverseDiagnostics, inverse_products

Penalty = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class HypergradientResult:
    r"""The hypergradient and how far to trust it.

    Attributes:
        value: :math:`dL_{out}/dh`, shaped like ``hparams``.
        outer_value: :math:`L_{out}(\hat\theta)`.
        stationarity: :math:`\|\nabla_\theta J(\hat\theta, h)\|`; the formula assumes it
            is 0 (the model minimizes the inner objective), so retrain further when it is not
            small against the gradient of the outer loss.
        inverse: Diagnostics of the inverse product.
        seconds: Wall-clock time.
    """

    value: torch.Tensor
    outer_value: float
    stationarity: float
    inverse: InverseDiagnostics
    seconds: float


def decays(hparams: torch.Tensor, space: ParamSpace) -> torch.Tensor:
    """The per-coordinate decays ``(d,)`` of a scalar, per-tensor ``(p,)`` or ``(d,)`` hparams.

    Raises:
        ValueError: ``hparams`` of another shape.
    """
    p, d = len(space.names), space.dim
    if hparams.dim() == 0:
        return hparams.expand(d)
    if hparams.shape == (p,):
        return torch.repeat_interleave(hparams, torch.tensor(space.numels))
    if hparams.shape == (d,):
        return hparams
    raise ValueError(
        f"hypergradient: weight-decay hparams must be a scalar, one per parameter tensor ({p},) "
        f"or one per coordinate ({d},); got shape {tuple(hparams.shape)}."
    )


def hypergradient(
    inner: Objective,
    outer: Objective,
    hparams: torch.Tensor,
    *,
    penalty: Penalty | None = None,
    ihvp: str = "cg",
    damping: float = 0.0,
    curvature: str = "hessian",
    tol: float | None = None,
    max_matvecs: int | None = None,
    seed: int = 0,
) -> HypergradientResult:
    r"""The implicit-function-theorem gradient of ``outer``'s loss with respect to ``hparams``.

    Args:
        inner: The training loss :math:`L_{in}` at the trained parameters :math:`\hat\theta`.
        outer: The validation loss :math:`L_{out}`, of the same model and parameters.
        hparams: :math:`h`: weight decay as a scalar, ``(p,)`` per parameter tensor or ``(d,)``
            per coordinate; or what ``penalty`` takes.
        penalty: ``penalty(theta, hparams) -> scalar``, :math:`P(\theta, h)` with ``theta``
            flat ``(d,)`` (default: weight decay :math:`\frac12\sum_j c_j\theta_j^2`).
        ihvp: ``"exact"``, ``"cg"`` or ``"lissa"``.
        damping: Extra :math:`\lambda` on :math:`\nabla^2_\theta J` (0: the exact formula).
        curvature: ``"hessian"`` (exact), or ``"ggn"`` / ``"fisher"`` for :math:`L_{in}`.
        tol: Relative residual tolerance of the inverse product (default 1e-6 in float64,
            1e-5 otherwise).
        max_matvecs: Products allowed for it.
        seed: Seed of Lanczos start vectors.

    Returns:
        HypergradientResult.

    Raises:
        ValueError: ``outer`` analyses other parameters than ``inner``, an unknown ``ihvp``
            or ``curvature``, hparams of a shape the penalty does not take, or an indefinite
            :math:`\nabla^2_\theta J` (the message names the fix).

    Example:
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> x = torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> model = nn.Linear(3, 1, bias=False).double().eval()
        >>> inner = Objective(model, [(x, x.sum(1, keepdim=True))], F.mse_loss)
        >>> outer = Objective(model, [(x, x[:, :1])], F.mse_loss)
        >>> r = hypergradient(inner, outer, torch.tensor(0.1, dtype=torch.float64))
        >>> r.value.shape, r.inverse.converged
        (torch.Size([]), True)
    """
    start = time.perf_counter()
    if ihvp not in ("exact", "cg", "lissa"):
        raise ValueError(
            f"hypergradient: ihvp must be 'exact', 'cg' or 'lissa', got {ihvp!r} (the Woodbury "
            "inverse is of the empirical Fisher, not of the Hessian the implicit function "
            "theorem needs)."
        )
    if outer.space.names != inner.space.names or outer.space.shapes != inner.space.shapes:
        raise ValueError(
            "hypergradient: the outer objective analyses other parameters than the inner one "
            f"({outer.space.names[:3]}... vs {inner.space.names[:3]}...); build both from the "
            "same model with the same params=."
        )
    if curvature not in CURVATURES:
        raise ValueError(f"hypergradient: curvature must be one of {tuple(CURVATURES)}.")
    theta = inner.space.join(inner.params).detach()
    h = hparams.detach().to(theta)
    P = penalty or (lambda t, hp: 0.5 * (decays(hp, inner.space) * t**2).sum())
    A, lam = _curvature(curvature_operator(inner, curvature), P, theta, h, penalty is None)
    stationarity = float((inner.gradient() + grad(P)(theta, h)).norm())
    v, diag = inverse_products(
        A,
        outer.gradient()[:, None],
        method=ihvp,
        damping=lam + damping,
        tol=tol,
        max_matvecs=max_matvecs,
        seed=seed,
        who="hypergradient",
    )
    v = v[:, 0].detach()
    mixed = grad(lambda hp: grad(P)(theta, hp) @ v)(h)
    seconds = time.perf_counter() - start
    return HypergradientResult(-mixed, float(outer.value()), stationarity, diag, seconds)


def _curvature(H: Operator, P: Penalty, theta, h, is_decay: bool) -> tuple[Operator, float]:
    r"""``(A, lam)`` with :math:`\nabla^2_\theta J = A + \lambda I`.

    One weight decay for all parameters becomes damping (CG then needs no definiteness
    check); other decays a diagonal operator; a user penalty its ``jvp``-of-``grad`` products.
    """
    if is_decay:
        c = decays(h, cast(ParamSpace, H.space))  # an objective's curvature has its layout
        if bool((c == c[0]).all()):
            return H, float(c[0])
        return H + _Penalty(H, lambda V: c[:, None] * V, bool((c >= 0).all())), 0.0

    def products(V: torch.Tensor) -> torch.Tensor:
        hvp = vmap(lambda v: jvp(lambda t: grad(P)(t, h), (theta,), (v,))[1])
        return hvp(V.T.to(theta)).T.to(V)

    return H + _Penalty(H, products, False), 0.0


class _Penalty(Operator):
    """The Hessian of the penalty with respect to the parameters, from a product function."""

    def __init__(self, like: Operator, products: Callable, psd: bool):
        tags = (SYMMETRIC, PSD) if psd else (SYMMETRIC,)
        super().__init__(like.shape[0], like.dtype, like.device, tags, like.space)
        self.products = products

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.products(V)
