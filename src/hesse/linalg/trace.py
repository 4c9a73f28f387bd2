"""Stochastic trace and diagonal estimators with standard errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._util import Counted, generator, mean_ci, rademacher

METHODS = ("hutch++", "hutchinson", "exact")


@dataclass(frozen=True)
class TraceResult:
    """A trace estimate with its uncertainty.

    Attributes:
        value: The estimate of ``tr(A)``.
        stderr: Its standard error (0 for ``method="exact"``).
        ci95: Student-t 95% confidence interval ``(lo, hi)``.
        n_matvecs: Matrix-vector products used.
        method: ``"hutch++"``, ``"hutchinson"``, ``"exact"`` or ``"slq"``.
        converged: False when ``target_stderr`` was asked for and not reached.
        samples: Number of random quadratic forms averaged (0 for ``"exact"``).
    """

    value: float
    stderr: float
    ci95: tuple[float, float]
    n_matvecs: int
    method: str
    converged: bool = True
    samples: int = 0


@dataclass(frozen=True)
class DiagonalResult:
    """An estimate of ``diag(A)``: ``value`` and ``stderr`` of shape ``(d,)``, ``n_matvecs``."""

    value: torch.Tensor
    stderr: torch.Tensor
    n_matvecs: int


def trace(
    A: Any,
    budget: int = 100,
    *,
    method: str = "hutch++",
    target_stderr: float | None = None,
    seed: int = 0,
    block_size: int = 10,
    progress: bool = False,
) -> TraceResult:
    r"""Estimate :math:`\mathrm{tr}(A)` from matrix-vector products.

    ``"hutchinson"`` averages :math:`z^\top A z` over Rademacher probes (Hutchinson 1989).
    ``"hutch++"`` (Meyer, Musco, Musco & Woodruff 2021, "Hutch++: optimal stochastic trace
    estimation") spends a third of the budget on a sketch :math:`Q = \mathrm{orth}(AS)`, a
    third on the exact :math:`\mathrm{tr}(Q^\top A Q)`, and the rest on Hutchinson for the
    deflated remainder :math:`(I-QQ^\top)A(I-QQ^\top)`; given :math:`Q` the estimate is unbiased
    and its standard error comes from the remainder's samples. ``"exact"`` sums
    :math:`e_i^\top A e_i` (``d`` products).

    Args:
        A: Operator or dense tensor ``(d, d)``.
        budget: Most products to spend (``>= 2``; ``>= 4`` for hutch++).
        method: ``"hutch++"``, ``"hutchinson"`` or ``"exact"``.
        target_stderr: Stop as soon as the standard error is at most this (checked after each
            block of probes); ``converged=False`` if the budget ends first.
        seed: Seed of the probes.
        block_size: Probes per pass over the data.
        progress: Show a progress bar.

    Returns:
        TraceResult.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> trace(A, method="exact").value
        55.0
    """
    if method not in METHODS:
        raise ValueError(f"trace: method must be one of {METHODS}, got {method!r}.")
    op = Counted(A, progress, A.shape[0] if method == "exact" else budget, "trace")
    try:
        if method == "exact":
            value = float(_exact_diagonal(op, block_size).sum())
            return TraceResult(value, 0.0, (value, value), op.n, method)
        gen = generator(seed)
        if method == "hutchinson":
            _need(budget, 2, method)
            return _hutchinson(op, gen, budget, target_stderr, block_size, None, 0.0, method)
        _need(budget, 4, method)
        s = budget // 3
        Q = torch.linalg.qr(op(rademacher(gen, op.d, s, op))).Q
        exact = float((Q * op(Q)).sum())
        return _hutchinson(op, gen, budget, target_stderr, block_size, Q, exact, method)
    finally:
        op.close()


def block_traces(
    A: Any, budget: int = 100, *, by: str = "module", seed: int = 0, block_size: int = 32
) -> dict[str, TraceResult]:
    r"""Traces of every diagonal block of ``A`` from one sweep of shared probes.

    For a Rademacher probe :math:`z`, :math:`z_b^\top (Az)_b` is an unbiased estimate of
    :math:`\mathrm{tr}(A_{bb})` for every block :math:`b` at once, so all blocks together cost
    ``budget`` products, not ``budget`` per block.

    Args:
        A: Operator with a parameter layout (``A.space``), e.g. a ``HessianOperator``.
        budget: Probes (products), ``>= 2``.
        by: ``"module"`` or ``"param"``.
        seed: Seed of the probes.
        block_size: Probes per pass over the data.

    Returns:
        ``{block name: TraceResult}`` (Hutchinson estimates with standard errors).
    """
    if getattr(A, "space", None) is None:
        raise ValueError("block_traces: the operator has no parameter layout (A.space).")
    _need(budget, 2, "block_traces")
    op, gen, groups = Counted(A), generator(seed), A.space.blocks(by)
    slices = A.space.slices()
    samples = {name: [] for name in groups}
    while op.n < budget:
        Z = rademacher(gen, op.d, min(block_size, budget - op.n), op)
        ZAZ = Z * op(Z)
        for name, names in groups.items():
            samples[name].append(sum(ZAZ[slices[n]].sum(0) for n in names))
    out = {}
    for name, parts in samples.items():
        value, se, ci = mean_ci(torch.cat(parts))
        out[name] = TraceResult(value, se, ci, op.n, "hutchinson", True, budget)
    return out


def diagonal(A: Any, budget: int = 100, *, seed: int = 0, block_size: int = 32) -> DiagonalResult:
    r"""Estimate :math:`\mathrm{diag}(A)` as the mean of :math:`z \odot Az` over Rademacher probes.

    Unbiased (Bekas, Kokiopoulou & Saad 2007, "An estimator for the diagonal of a matrix");
    the standard error of each entry is its sample standard deviation over :math:`\sqrt{n}`.

    Args:
        A: Operator or dense tensor ``(d, d)``.
        budget: Probes, ``>= 2``.
        seed: Seed of the probes.
        block_size: Probes per pass over the data.

    Returns:
        DiagonalResult with ``value`` and ``stderr`` of shape ``(d,)``.
    """
    _need(budget, 2, "diagonal")
    op, gen = Counted(A), generator(seed)
    parts = []
    while op.n < budget:
        Z = rademacher(gen, op.d, min(block_size, budget - op.n), op)
        parts.append(Z * op(Z))
    X = torch.cat(parts, 1)
    return DiagonalResult(X.mean(1), X.std(1) / X.shape[1] ** 0.5, op.n)


def _hutchinson(op, gen, budget, target, block_size, Q, exact, method) -> TraceResult:
    """Hutchinson on ``(I - QQ^T) A (I - QQ^T)`` (``Q=None``: on ``A``), plus ``exact``."""
    xs = torch.zeros(0, dtype=torch.float64)
    converged = target is None
    while op.n < budget:
        Z = rademacher(gen, op.d, min(block_size, budget - op.n), op)
        if Q is not None:
            Z = Z - Q @ (Q.T @ Z)
        xs = torch.cat([xs, (Z * op(Z)).sum(0).double().cpu()])
        if target is not None and xs.numel() >= 2 and mean_ci(xs)[1] <= target:
            converged = True
            break
    mean, se, (lo, hi) = mean_ci(xs)
    return TraceResult(
        exact + mean, se, (exact + lo, exact + hi), op.n, method, converged, xs.numel()
    )


def _exact_diagonal(op: Counted, block_size: int) -> torch.Tensor:
    diag = []
    for i in range(0, op.d, block_size):
        E = torch.zeros(op.d, min(block_size, op.d - i), dtype=op.dtype, device=op.device)
        E[torch.arange(i, i + E.shape[1]), torch.arange(E.shape[1])] = 1
        diag.append(op(E)[i : i + E.shape[1]].diagonal())
    return torch.cat(diag).double()


def _need(budget: int, least: int, what: str) -> None:
    if budget < least:
        raise ValueError(f"{what}: budget must be at least {least} products, got {budget}.")
