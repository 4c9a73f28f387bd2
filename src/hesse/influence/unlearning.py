r"""Unlearning: a model with a forget set removed, without retraining from scratch.

Three updates of the trained parameters :math:`\hat\theta`, for a training objective that is the
mean loss over the forget and remaining points plus weight decay :math:`\frac{w}{2}\|\theta\|^2`.
The mean is weighted as :class:`~hesse.Objective` weighs it: :math:`L_F` and :math:`L_R` are the
mean losses of the two sets, over their weights :math:`W_F` and :math:`W_R` (sample counts for a
plain mean; counted tokens under ``ignore_index``; sums of class weights), and the full mean is
:math:`(W_F L_F + W_R L_R) / W` with :math:`W = W_F + W_R`.

- ``"newton"``: one Newton step on the remaining objective
  :math:`R(\theta) = L_R(\theta) + \frac{w}{2}\|\theta\|^2` (Guo et al. 2020, "Certified data
  removal from machine learning models"; Koh & Liang 2017 for its influence form),

  .. math:: \theta' = \hat\theta - (\nabla^2 L_R + (w + \lambda) I)^{-1}
            (\nabla L_R(\hat\theta) + w\hat\theta).

- ``"influence"``: the same inverse applied to the forget set's share of that gradient only,
  the influence-function removal step (Koh & Liang 2017),

  .. math:: \theta' = \hat\theta - \frac{W_F}{W} (\nabla^2 L_R + (w + \lambda) I)^{-1} d,
            \qquad d = \nabla L_R(\hat\theta) - \nabla L_F(\hat\theta).

  It equals ``"newton"`` at a stationary point of the full objective
  (:math:`\nabla R(\hat\theta) = \frac{W_F}{W} d` there). A model that stopped short of one
  (Adam for a fixed budget, early stopping) has a residual gradient
  :math:`\nabla J(\hat\theta) = \nabla R(\hat\theta) - \frac{W_F}{W} d`, which Newton's
  step also follows: it finishes training along low-curvature directions and can land far from
  a model retrained for the same budget. ``"influence"`` removes the forget set's contribution
  only; ``UnlearnResult.residual`` says which case a model is in.
- ``"iau"``: IAU's first-order step (Liu, Wu, Lian & Chen 2025, "Efficient machine
  unlearning via influence approximation"): unlearning as the reverse of incremental
  learning, one step along :math:`d = \nabla L_R(\hat\theta) - \nabla L_F(\hat\theta)`,

  .. math:: \theta' = \hat\theta - t\, d,

  with :math:`t = \eta\, W_F / W` for a given learning rate :math:`\eta`, or, by default, the
  step that minimizes the quadratic model of :math:`R` along :math:`d`,
  :math:`t = \nabla R(\hat\theta)^\top d \,/\, d^\top (\nabla^2 L_R + (w+\lambda) I)\, d` (one
  curvature product; no tuning). At a minimum of the full objective
  :math:`\nabla R(\hat\theta) = \frac{W_F}{W} d`, so Newton's step is
  :math:`-\frac{W_F}{W} H^{-1} d`: IAU replaces :math:`H^{-1}` by a multiple of the identity
  (with :math:`\eta = 1` its step is the gradient step :math:`-\nabla R(\hat\theta)`).
  IAU's training-time gradient-norm regularizer is not part of this function.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..operators import (
    CURVATURES,
    KRONECKER_KINDS,
    Operator,
    curvature_operator,
    kronecker_operator,
)
from ..problem._per_sample import data_weight
from ..problem._positions import sample_count
from ..problem.objective import Objective
from ._ihvp import KRONECKER, InverseDiagnostics, inverse_products

METHODS = ("newton", "influence", "iau")
IHVPS = ("exact", "cg", "lissa", "kfac", "ekfac")


@dataclass(frozen=True)
class UnlearnResult:
    r"""A model with the forget set removed, and the step that removed it.

    Attributes:
        model: A new model (a deep copy, in eval mode); the original is untouched.
        method: ``"newton"``, ``"influence"`` or ``"iau"``.
        delta: ``(d,)`` the parameter change :math:`\theta' - \hat\theta`.
        step_size: IAU's :math:`t` (None for the others).
        inverse: Diagnostics of the inverse product (None for IAU).
        n_forget: Samples in the forget set; ``n_remain`` in the remaining set.
        n_remain: Samples in the remaining set.
        n_matvecs: Curvature products spent.
        seconds: Wall-clock time.
        residual: :math:`\|\nabla J(\hat\theta)\| / \|\frac{W_F}{W} d\|`, the full
            objective's gradient at the model relative to the forget set's share of the
            remaining gradient: near 0 at a minimum of the training objective; above about 1,
            ``"newton"`` mostly continues training, and ``"influence"`` is the removal step.
    """

    model: nn.Module
    method: str
    delta: torch.Tensor
    step_size: float | None
    inverse: InverseDiagnostics | None
    n_forget: int
    n_remain: int
    n_matvecs: int
    seconds: float
    residual: float = float("nan")


def unlearn(
    model: nn.Module,
    forget_data: Any,
    remain_data: Any,
    loss: Any = None,
    *,
    method: str = "newton",
    weight_decay: float = 0.0,
    damping: float = 0.0,
    ihvp: str = "cg",
    curvature: str | None = None,
    lr: float | None = None,
    params: Any = None,
    tol: float | None = None,
    max_matvecs: int | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> UnlearnResult:
    r"""Remove ``forget_data`` from a model trained on it and ``remain_data`` (module docstring).

    Args:
        model: The trained model (eval mode). It is not modified.
        forget_data: The points to remove (batches as ``Objective`` takes them).
        remain_data: The points that stay.
        loss: ``loss(outputs, targets) -> mean loss``.
        method: ``"newton"``, ``"influence"`` or ``"iau"``.
        weight_decay: :math:`w`, the weight decay of the training objective (0 if none).
        damping: :math:`\lambda \ge 0` added to the curvature on top of ``weight_decay``
            (needed when the remaining loss's Hessian is indefinite).
        ihvp: The inverse of ``"newton"`` and ``"influence"``: ``"exact"``, ``"cg"``,
            ``"lissa"``, or the exact damped inverse of a Kronecker-factored approximation,
            ``"kfac"`` or ``"ekfac"`` (every
            analysed parameter must sit in a layer they factorize: ``nn.Linear``,
            ``nn.Conv2d``, ``nn.Embedding``). IAU ignores it.
        curvature: ``"hessian"``, ``"ggn"`` or ``"fisher"`` (of the remaining loss; default
            ``"hessian"``, and ``"ggn"`` for ``"kfac"``/``"ekfac"``, which factorize only the
            GGN or the empirical Fisher). IAU's quadratic step uses it too.
        lr: IAU's learning rate :math:`\eta`, for the step :math:`t = \eta W_F / W` (default:
            the quadratic-model step).
        params: Which parameters are updated (``Objective``'s ``params=``).
        tol: Relative residual tolerance of Newton's inverse product (default 1e-6 in
            float64, 1e-5 otherwise).
        max_matvecs: Products allowed for it.
        dtype: Compute dtype; the new model keeps the original's.
        seed: Seed of Lanczos start vectors.

    Returns:
        UnlearnResult.

    Raises:
        ValueError: an unknown method, ihvp or curvature, negative ``weight_decay`` or
            ``damping``, or an indefinite curvature for Newton (the message names the fix).
    """
    start = time.perf_counter()
    curvature = _check(method, ihvp, curvature, weight_decay, damping)
    remain = Objective(model, remain_data, loss, params=params, dtype=dtype)
    forget = Objective(model, forget_data, loss, params=params, dtype=dtype)
    theta = remain.space.join(remain.params)
    g_remain = remain.gradient()
    grad_r = g_remain + weight_decay * theta
    lam = weight_decay + damping
    n_f, n_r = _count(forget), _count(remain)
    d = g_remain - forget.gradient()
    w_f, w_r = float(data_weight(forget)), float(data_weight(remain))
    share = w_f / (w_f + w_r)
    residual = float((grad_r - share * d).norm() / (share * d).norm().clamp_min(1e-300))
    if method != "iau":
        op: Operator = (
            kronecker_operator(remain, ihvp, curvature)
            if ihvp in KRONECKER
            else curvature_operator(remain, curvature)
        )
        x, diag = inverse_products(
            op,
            (grad_r if method == "newton" else share * d)[:, None],
            method=ihvp,
            damping=lam,
            tol=tol,
            max_matvecs=max_matvecs,
            seed=seed,
            who="unlearn",
        )
        delta, step, used = -x[:, 0], None, diag.n_matvecs
    else:
        op = curvature_operator(remain, curvature)
        step = _quadratic_step(op, grad_r, d, lam) if lr is None else lr * share
        delta, diag, used = -step * d, None, op.n_matvecs
    new = _with_params(model, remain, theta + delta)
    seconds = time.perf_counter() - start
    return UnlearnResult(new, method, delta, step, diag, n_f, n_r, used, seconds, residual)


def _check(method, ihvp, curvature, weight_decay, damping) -> str:
    """Validate the settings; returns the curvature (its default resolved)."""
    if method not in METHODS:
        raise ValueError(f"unlearn: method must be one of {METHODS}, got {method!r}.")
    if ihvp not in IHVPS:
        raise ValueError(f"unlearn: ihvp must be one of {IHVPS}, got {ihvp!r}.")
    if method != "iau" and ihvp in KRONECKER:
        curvature = curvature or "ggn"
        if curvature not in KRONECKER_KINDS:
            raise ValueError(
                f"unlearn(ihvp={ihvp!r}) inverts a Kronecker-factored approximation of the GGN "
                f"(curvature='ggn') or of the empirical Fisher ('fisher'), not of the "
                f"{curvature!r}; pass one of those, or ihvp='cg' for the {curvature!r}."
            )
    curvature = curvature or "hessian"
    if curvature not in CURVATURES:
        raise ValueError(
            f"unlearn: curvature must be one of {tuple(CURVATURES)}, got {curvature!r}."
        )
    for name, value in (("weight_decay", weight_decay), ("damping", damping)):
        if not value >= 0:
            raise ValueError(f"unlearn: {name} must be >= 0, got {value}.")
    return curvature


def _quadratic_step(op, g: torch.Tensor, d: torch.Tensor, lam: float) -> float:
    r"""The :math:`t` minimizing :math:`R(\theta - t d)`'s quadratic model (one product)."""
    curv = float(d @ (op @ d)) + lam * float(d @ d)
    if not curv > 0:
        raise ValueError(
            f"unlearn(method='iau'): the curvature along the unlearning direction is {curv:.3g} "
            "<= 0, so the quadratic model has no minimum along it; pass lr= (IAU's learning "
            "rate) or damping > 0."
        )
    return float(g @ d) / curv


def _count(objective: Objective) -> int:
    """Samples in the objective's data (tuple, dict or tensor batches alike)."""
    counts = [sample_count(b) for b in objective.batches()]
    known = [n for n in counts if n is not None]
    if len(known) < len(counts):
        raise ValueError("unlearn: a batch holds no tensor to count its samples from.")
    return sum(known)


def _with_params(model: nn.Module, objective: Objective, theta: torch.Tensor) -> nn.Module:
    """A deep copy of ``model`` whose analysed parameters are ``theta`` (flat)."""
    new = copy.deepcopy(model).eval()
    values = objective.space.split(theta.detach())
    named = dict(new.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            named[name].copy_(value.to(named[name].dtype))
    return new
