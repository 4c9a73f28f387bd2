"""Stability thresholds of an optimizer at a learning rate, measured against the curvature."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._positions import sample_count
from ..analysis.stability import Verdict, gd_verdict, omitted, sgd_verdict
from ..linalg import TraceResult, eigs, trace
from ..objective import Objective
from ..operators import HessianOperator

OPTIMIZERS = ("sgd", "adam")
"""Optimizers :func:`stability` takes (heavy-ball momentum through ``momentum=``)."""


@dataclass(frozen=True)
class Stability:
    """Thresholds and verdicts of one optimizer setting at the current weights.

    Attributes:
        lr: Learning rate ``eta``.
        momentum: Heavy-ball ``beta`` (SGD) or ``beta1`` (Adam).
        optimizer: ``"sgd"`` or ``"adam"``.
        batch_size: Mini-batch size (None: full batch).
        n_samples: Samples in the objective's data.
        loss: Mean loss at the current weights.
        lambda_max: Largest Hessian eigenvalue.
        residual: Its residual bound.
        trace: Hutch++ trace of the Hessian (None when not needed).
        thresholds: ``{name: value}``: ``"gd"`` = ``(2 + 2 beta)/eta``, ``"sgd_trace"`` =
            ``2/eta``, ``"adam"`` = ``(2 + 2 beta1)/((1 - beta1) eta)``, those that apply.
        verdicts: :class:`hesse.analysis.Verdict` of each criterion that applies.
        notes: Why a criterion was left out.
    """

    lr: float
    momentum: float
    optimizer: str
    batch_size: int | None
    n_samples: int
    loss: float
    lambda_max: float
    residual: float
    trace: TraceResult | None
    thresholds: dict
    verdicts: tuple[Verdict, ...]
    notes: tuple[str, ...]


def stability(
    obj: Objective,
    lr: float,
    *,
    momentum: float = 0.0,
    optimizer: str = "sgd",
    batch_size: int | None = None,
    budget: int = 60,
    seed: int = 0,
) -> Stability:
    r"""Linear-stability thresholds at ``lr`` and where the model's curvature stands against them.

    - Full-batch GD with heavy-ball momentum :math:`\beta`: stable only when
      :math:`\lambda_{\max}(H) \le (2 + 2\beta)/\eta` (Cohen et al. 2021, "Gradient descent on
      neural networks typically occurs at the edge of stability").
    - SGD with mini-batches (``batch_size`` below the data size, no momentum): at a global
      minimum, linear stability needs :math:`\mathrm{Tr}(H) \le 2/\eta` (Wu & Su 2023, "The
      implicit regularization of dynamical stability in stochastic gradient descent"); the
      trace comes from Hutch++ with a 95% CI. With momentum that criterion is not derived, so it
      is left out with a note.
    - Adam: the threshold :math:`(2 + 2\beta_1)/((1 - \beta_1)\eta)` bounds the preconditioned
      sharpness :math:`\lambda_{\max}(P^{-1}H)` (Cohen et al. 2022, "Adaptive gradient methods
      at the edge of stability"); it is reported, with no verdict (it needs Adam's state).

    The verdicts come from :mod:`hesse.analysis.stability` (the same texts as the report).

    Args:
        obj: The training objective (all training data for the GD criterion).
        lr: Learning rate :math:`\eta > 0`.
        momentum: Heavy-ball :math:`\beta` for SGD, :math:`\beta_1` for Adam; in ``[0, 1)``.
        optimizer: ``"sgd"`` or ``"adam"``.
        batch_size: SGD mini-batch size; None or the data size means full-batch GD.
        budget: Products of the trace estimate.
        seed: Seed of the Lanczos start and the trace probes.

    Returns:
        Stability.

    Raises:
        ValueError: ``lr <= 0``, an unknown optimizer, or ``momentum`` outside ``[0, 1)``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> x, y = torch.eye(3, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64)
        >>> model = nn.Linear(3, 1, bias=False).double()
        >>> s = stability(Objective(model, [(x, y)], nn.functional.mse_loss), lr=1.0)
        >>> round(s.lambda_max, 6), s.thresholds["gd"], s.verdicts[0].status  # H = 2I/3
        (0.666667, 2.0, 'stable')
    """
    if not lr > 0:
        raise ValueError(f"stability: lr must be > 0, got {lr}.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"stability: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
    why = omitted("adam" if optimizer == "adam" else "sgd", momentum)  # also checks momentum
    op, n = HessianOperator(obj), _sample_count(obj)
    top = eigs(op, 1, seed=seed, tol=1e-8 if obj.dtype == torch.float64 else None)
    lam, res = float(top.values[0]), float(top.residuals[0])
    loss = float(obj.value())
    minibatch = batch_size is not None and batch_size < n
    thresholds, verdicts, notes = {}, [], []
    if why is not None:
        thresholds["adam"] = (2 + 2 * momentum) / ((1 - momentum) * lr)
        notes.append(why)
    else:
        thresholds["gd"] = (2 + 2 * momentum) / lr
        verdicts.append(gd_verdict(lam, res, lr, converged=top.converged, momentum=momentum))
    tr = None
    if minibatch and optimizer == "sgd" and momentum == 0:
        tr = trace(op, budget, seed=seed)
        thresholds["sgd_trace"] = 2 / lr
        verdicts.append(sgd_verdict(tr.value, tr.ci95, lr, loss))
    elif minibatch and optimizer == "sgd":
        notes.append(
            "No SGD trace verdict: Tr(H) <= 2/η is derived for plain SGD (Wu & Su 2023); "
            f"with momentum β = {momentum:g} only the GD threshold (2 + 2β)/η is reported."
        )
    return Stability(
        lr, momentum, optimizer, batch_size, n, loss, lam, res, tr, thresholds, tuple(verdicts),
        tuple(notes),
    )  # fmt: skip


def _sample_count(obj: Objective) -> int:
    """Samples in the objective's data (dim 0 of each batch)."""
    return sum(sample_count(b) or 0 for b in obj.batches())
