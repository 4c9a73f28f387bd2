r"""Unlearning: a model with a forget set removed, without retraining from scratch.

Two updates of the trained parameters :math:`\hat\theta`, for a training objective that is the
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

from ..operators import CURVATURES, curvature_operator
from ..problem._per_sample import data_weight
from ..problem._positions import sample_count
from ..problem.objective import Objective
from ._ihvp import InverseDiagnostics, inverse_products

METHODS = ("newton", "iau")


@dataclass(frozen=True)
class UnlearnResult:
    r"""A model with the forget set removed, and the step that removed it.

    Attributes:
        model: A new model (a deep copy, in eval mode); the original is untouched.
        method: ``"newton"`` or ``"iau"``.
        delta: ``(d,)`` the parameter change :math:`\theta' - \hat\theta`.
        step_size: IAU's :math:`t` (None for Newton).
        inverse: Diagnostics of Newton's inverse product (None for IAU).
        n_forget: Samples in the forget set; ``n_remain`` in the remaining set.
        n_remain: Samples in the remaining set.
        n_matvecs: Curvature products spent.
        seconds: Wall-clock time.
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
    curvature: str = "hessian",
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
        method: ``"newton"`` or ``"iau"``.
        weight_decay: :math:`w`, the weight decay of the training objective (0 if none).
        damping: :math:`\lambda \ge 0` added to the curvature on top of ``weight_decay``
            (needed when the remaining loss's Hessian is indefinite).
        ihvp: Newton's inverse: ``"exact"``, ``"cg"`` or ``"lissa"``.
        curvature: ``"hessian"``, ``"ggn"`` or ``"fisher"`` (of the remaining loss).
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
    _check(method, ihvp, curvature, weight_decay, damping)
    remain = Objective(model, remain_data, loss, params=params, dtype=dtype)
    forget = Objective(model, forget_data, loss, params=params, dtype=dtype)
    theta = remain.space.join(remain.params)
    g_remain = remain.gradient()
    grad_r = g_remain + weight_decay * theta
    op = curvature_operator(remain, curvature)
    lam = weight_decay + damping
    n_f, n_r = _count(forget), _count(remain)
    if method == "newton":
        x, diag = inverse_products(
            op,
            grad_r[:, None],
            method=ihvp,
            damping=lam,
            tol=tol,
            max_matvecs=max_matvecs,
            seed=seed,
            who="unlearn",
        )
        delta, step, used = -x[:, 0], None, diag.n_matvecs
    else:
        d = g_remain - forget.gradient()
        if lr is None:
            step = _quadratic_step(op, grad_r, d, lam)
        else:
            w_f, w_r = data_weight(forget), data_weight(remain)
            step = lr * w_f / (w_f + w_r)
        delta, diag, used = -step * d, None, op.n_matvecs
    new = _with_params(model, remain, theta + delta)
    seconds = time.perf_counter() - start
    return UnlearnResult(new, method, delta, step, diag, n_f, n_r, used, seconds)


def _check(method, ihvp, curvature, weight_decay, damping) -> None:
    if method not in METHODS:
        raise ValueError(f"unlearn: method must be one of {METHODS}, got {method!r}.")
    if ihvp not in ("exact", "cg", "lissa"):
        raise ValueError(f"unlearn: ihvp must be 'exact', 'cg' or 'lissa', got {ihvp!r}.")
    if curvature not in CURVATURES:
        raise ValueError(
            f"unlearn: curvature must be one of {tuple(CURVATURES)}, got {curvature!r}."
        )
    for name, value in (("weight_decay", weight_decay), ("damping", damping)):
        if not value >= 0:
            raise ValueError(f"unlearn: {name} must be >= 0, got {value}.")


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
