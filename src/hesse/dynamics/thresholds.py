"""Stability thresholds of an optimizer at a learning rate, measured against the curvature."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch

from ..linalg import EigResult, TraceResult, eigs, frobenius_norm, trace
from ..linalg._util import t_quantile
from ..operators import HessianOperator
from ..problem._positions import rows_of, sample_count, samples_in
from ..problem.objective import Objective
from ._common import one_batch
from .sgd_verdicts import BatchNoise, sgd_verdict
from .verdicts import Verdict, gd_threshold, gd_verdict, omitted

OPTIMIZERS = ("sgd", "adam")
"""Optimizers :func:`stability` takes (momentum through ``momentum=`` and ``nesterov=``)."""


@dataclass(frozen=True)
class Stability:
    """Thresholds and verdicts of one optimizer setting at the current weights.

    Attributes:
        lr: Learning rate ``eta``.
        momentum: Momentum ``beta`` (SGD) or ``beta1`` (Adam).
        optimizer: ``"sgd"`` or ``"adam"``.
        batch_size: Mini-batch size (None: full batch).
        n_samples: Samples in the objective's data.
        loss: Mean loss at the current weights.
        lambda_max: Largest Hessian eigenvalue.
        residual: Its residual bound.
        trace: Hutch++ trace of the Hessian (None when not needed).
        thresholds: ``{name: value}``: ``"gd"`` = :func:`hesse.dynamics.verdicts.gd_threshold`
            (``2/eta``; ``(2 + 2 beta)/eta`` heavy ball; ``(2 + 2 beta)/((1 + 2 beta) eta)``
            Nesterov), ``"sgd"`` = ``2/eta`` (what SGD's batch moment and sufficient bound are
            held against), ``"adam"`` = ``(2 + 2 beta1)/((1 - beta1) eta)``; those that apply.
        verdicts: :class:`hesse.analysis.Verdict` of each criterion that applies.
        noise: The per-sample spread the SGD verdict used (None without one).
        notes: Why a criterion was left out.
        nesterov: Whether the momentum is Nesterov's.
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
    noise: BatchNoise | None
    notes: tuple[str, ...]
    nesterov: bool = False


def stability(
    obj: Objective,
    lr: float,
    *,
    momentum: float = 0.0,
    nesterov: bool = False,
    optimizer: str = "sgd",
    batch_size: int | None = None,
    budget: int = 60,
    max_samples: int = 256,
    seed: int = 0,
) -> Stability:
    r"""Linear-stability thresholds at ``lr`` and where the model's curvature stands against them.

    - Full-batch GD with momentum :math:`\beta`: stable only when :math:`\lambda_{\max}(H)` is
      below :func:`hesse.dynamics.verdicts.gd_threshold`: :math:`(2 + 2\beta)/\eta` with heavy
      ball, :math:`(2 + 2\beta)/((1 + 2\beta)\eta)` with ``nesterov=True`` (Cohen et al. 2021,
      "Gradient descent on neural networks typically occurs at the edge of stability").
    - SGD with mini-batches (``batch_size`` below the data size, no momentum), at an
      interpolating minimum: the batch-size-dependent conditions of
      :func:`hesse.analysis.sgd_verdict`. Necessary:
      :math:`\mathbb E_B\|H_B\|_F^2 / \mathrm{tr}\,H \le 2/\eta`; sufficient:
      :math:`(1 - \gamma_B)\lambda_{\max}(H) + \gamma_B \max_i \lambda_{\max}(H_i) \le 2/\eta`,
      :math:`\gamma_B = (n - B)/(B(n - 1))`; "indeterminate" between them. This measures the
      trace (Hutch++) and :math:`\|H\|_F^2` (Hutch++ on :math:`H^2`), ``budget`` products each,
      then visits the samples one by one: :math:`\|H_i\|_F^2` by Hutch++ (``max(4, budget/n)``
      single-sample products each, exact when :math:`H_i` has rank up to a third of that, as
      at an interpolating minimum with few outputs) and :math:`\lambda_{\max}(H_i)` by
      Lanczos.
      Above ``max_samples`` samples it visits a random ``max_samples`` of them, which estimates
      the mean but bounds no maximum, so the verdict cannot be "stable". With momentum the
      criterion is not derived, so it is left out with a note.
    - Adam: the threshold :math:`(2 + 2\beta_1)/((1 - \beta_1)\eta)` bounds the preconditioned
      sharpness :math:`\lambda_{\max}(P^{-1}H)` (Cohen et al. 2022, "Adaptive gradient methods
      at the edge of stability"); it is reported, with no verdict (it needs Adam's state).

    The verdicts come from :mod:`hesse.dynamics.verdicts` (the same texts as the report).

    Args:
        obj: The training objective (all training data: its samples are what batches are drawn
            from).
        lr: Learning rate :math:`\eta > 0`.
        momentum: :math:`\beta` for SGD, :math:`\beta_1` for Adam; in ``[0, 1)``.
        nesterov: SGD's momentum is Nesterov's (PyTorch's ``SGD(nesterov=True)``).
        optimizer: ``"sgd"`` or ``"adam"``.
        batch_size: SGD mini-batch size; None or the data size means full-batch GD.
        budget: Products of the trace and Frobenius estimates (and the least number of
            single-sample products of the per-sample one).
        max_samples: Most samples visited one by one for the SGD verdict.
        seed: Seed of the Lanczos starts and the probes.

    Returns:
        Stability.

    Raises:
        ValueError: ``lr <= 0``, an unknown optimizer, ``momentum`` outside ``[0, 1)``,
            ``nesterov`` without momentum or with Adam, ``batch_size < 1``, or
            ``max_samples < 2``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> x, y = torch.eye(3, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64)
        >>> model = nn.Linear(3, 1, bias=False).double()
        >>> s = stability(Objective(model, [(x, y)], nn.functional.mse_loss), lr=1.0)
        >>> round(s.lambda_max, 6), s.thresholds["gd"], s.verdicts[0].status  # H = 2I/3
        (0.666667, 2.0, 'stable')
    """
    _check(lr, optimizer, momentum, nesterov, batch_size, max_samples)
    why = omitted("adam" if optimizer == "adam" else "sgd", momentum)  # also checks momentum
    op, n = HessianOperator(obj), sum(sample_count(b) or 0 for b in obj.batches())
    top = eigs(op, 1, seed=seed, tol=1e-8 if obj.dtype == torch.float64 else None)
    lam, res = float(top.values[0]), float(top.residuals[0])
    loss = float(obj.value())
    minibatch = batch_size is not None and batch_size < n
    thresholds, verdicts, notes = {}, [], []
    if why is not None:
        thresholds["adam"] = (2 + 2 * momentum) / ((1 - momentum) * lr)
        notes.append(why)
    else:
        thresholds["gd"] = gd_threshold(lr, momentum, nesterov=nesterov)
        verdicts.append(
            gd_verdict(lam, res, lr, converged=top.converged, momentum=momentum, nesterov=nesterov)
        )
    tr = noise = None
    if minibatch and optimizer == "sgd" and momentum == 0:
        tr = trace(op, budget, seed=seed)
        # minibatch is only True when batch_size is not None
        noise = _batch_noise(obj, top, cast(int, batch_size), budget, max_samples, seed)
        thresholds["sgd"] = 2 / lr
        verdicts.append(sgd_verdict(tr.value, tr.ci95, lr, loss, noise=noise))
    elif minibatch and optimizer == "sgd":
        notes.append(
            "No SGD verdict: its batch-size conditions are derived for plain SGD; with "
            f"momentum β = {momentum:g} only the GD threshold is reported."
        )
    return Stability(
        lr, momentum, optimizer, batch_size, n, loss, lam, res, tr, thresholds, tuple(verdicts),
        noise, tuple(notes), nesterov,
    )  # fmt: skip


def _check(
    lr: float,
    optimizer: str,
    momentum: float,
    nesterov: bool,
    batch_size: int | None,
    max_samples: int,
) -> None:
    """Refuse arguments :func:`stability` cannot honour (momentum is checked by ``omitted``)."""
    if not lr > 0:
        raise ValueError(f"stability: lr must be > 0, got {lr}.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"stability: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
    if nesterov and (optimizer != "sgd" or momentum == 0):
        raise ValueError(
            "stability: nesterov=True needs optimizer='sgd' and a momentum > 0 (as PyTorch's "
            f"SGD does), got optimizer={optimizer!r} and momentum={momentum}."
        )
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"stability: batch_size must be >= 1 (or None), got {batch_size}.")
    if max_samples < 2:
        raise ValueError(f"stability: max_samples must be >= 2, got {max_samples}.")


def _batch_noise(
    obj: Objective, top: EigResult, batch_size: int, budget: int, max_samples: int, seed: int
) -> BatchNoise:
    """Measure what :func:`hesse.analysis.sgd_verdict` needs besides the trace.

    ``top`` is the Lanczos run of λmax(H): its Ritz value minus its residual bounds λmax from
    below, and plus it from above once it converged.
    """
    lam, res = float(top.values[0]), float(top.residuals[0])
    sharpness = (lam - res, lam + res if top.converged else math.inf)
    data = one_batch(list(obj.batches()), "stability")
    n = samples_in(data, "stability")
    squared = frobenius_norm(HessianOperator(obj), budget, seed=seed).squared
    gen = torch.Generator().manual_seed(seed)
    every = n <= max_samples
    index = torch.arange(n) if every else torch.randperm(n, generator=gen)[:max_samples]
    probes = max(4, math.ceil(budget / len(index)))
    squares, tops = [], []
    for i in index.tolist():
        op = HessianOperator(obj.with_data([rows_of(data, slice(i, i + 1))]))
        squares.append(frobenius_norm(op, probes, seed=seed + i).squared)
        tops.append(_top_bound(op, seed) if every else math.inf)
    found = max(tops)
    return BatchNoise(
        batch_size, n, sharpness, (squared.value, *squared.ci95), _mean(squares, every),
        found if math.isfinite(found) else None,
    )  # fmt: skip


def _top_bound(op: HessianOperator, seed: int) -> float:
    """An upper bound on ``op``'s largest eigenvalue (infinite when Lanczos did not converge).

    The Ritz value plus its residual bound; a loose tolerance (1e-4 relative, the dtype's floor
    if higher) only widens the bound a little and saves a third of the products.
    """
    tol = max(1e-4, 8 * torch.finfo(op.dtype).eps)
    top = eigs(op, 1, tol=tol, seed=seed)
    return float(top.values[0] + top.residuals[0]) if top.converged else math.inf


def _mean(squares: list[TraceResult], every: bool) -> tuple[float, float, float]:
    """The mean of per-sample estimates and its 95% interval.

    Over every sample, the only error is each estimate's own, and they are independent: the
    mean's standard error pools theirs, ``sqrt(sum se_i^2) / m`` (0 where Hutch++'s sketch
    holds a sample's whole Hessian), with a normal interval (93-97% coverage measured on
    24-sample MLPs). Over a random subset the samples' spread adds to it: a Student-t interval
    over the estimates.
    """
    x = torch.tensor([r.value for r in squares], dtype=torch.float64)
    m, mean = len(x), float(x.mean())
    if every:
        half = 1.96 * math.sqrt(sum(r.stderr**2 for r in squares)) / m
    else:
        half = t_quantile(m) * float(x.std()) / math.sqrt(m)
    return mean, mean - half, mean + half
