"""Stochastic trace, Frobenius-norm and diagonal estimators with standard errors."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from scipy import stats

from ._util import Counted, generator, mean_ci, rademacher

METHODS = ("hutch++", "hutchinson", "exact")
MIN_SAMPLES = 20  # fewest probes before target_stderr may stop sampling (see trace)


@dataclass(frozen=True)
class TraceResult:
    """A trace estimate with its uncertainty.

    Attributes:
        value: The estimate of ``tr(A)``.
        stderr: Its standard error (0 for ``method="exact"``).
        ci95: 95% confidence interval ``(lo, hi)``; ``trace`` says what it assumes.
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
class FrobeniusResult:
    r"""An estimate of the Frobenius norm :math:`\|A\|_F` with its uncertainty.

    Attributes:
        value: The estimate of :math:`\|A\|_F`: the square root of ``squared.value`` (slightly
            biased low by Jensen's inequality; ``squared.value`` is the unbiased one).
        stderr: Its standard error by the delta method, ``squared.stderr / (2 * value)``.
        ci95: 95% interval for :math:`\|A\|_F`: the square roots of ``squared.ci95`` (clipped
            at 0), so it covers exactly when that interval does.
        n_matvecs: Matrix-vector products used.
        squared: The estimate of :math:`\|A\|_F^2 = \mathrm{tr}(A^\top A)` as a
            ``TraceResult`` (unbiased ``value``, ``stderr``, ``ci95``, ``method``, ``samples``).
    """

    value: float
    stderr: float
    ci95: tuple[float, float]
    n_matvecs: int
    squared: TraceResult


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

    ``"hutchinson"`` averages :math:`x_i = z_i^\top A z_i` over Rademacher probes (Hutchinson
    1989). ``"hutch++"`` (Meyer, Musco, Musco & Woodruff 2021, "Hutch++: optimal stochastic
    trace estimation") spends a third of the budget on a sketch :math:`Q = \mathrm{orth}(AS)`
    (at most ``d`` columns), a third on the exact :math:`\mathrm{tr}(Q^\top A Q)`, and the rest
    on Hutchinson for the deflated remainder :math:`M = PAP`, :math:`P = I - QQ^\top`; given
    :math:`Q` the estimate is unbiased. ``"exact"`` sums :math:`e_i^\top A e_i` (``d``
    products).

    **The interval** is :math:`\bar x \pm t_{0.975,\,n-1}\,\hat\sigma/\sqrt n` (``stderr`` is
    :math:`\hat\sigma/\sqrt n`), widened by a round-off allowance of :math:`\sqrt d\,\epsilon`
    times the magnitudes summed. :math:`\hat\sigma^2` is not the sample variance of the
    :math:`x_i` but an unbiased estimate of :math:`\mathrm{Var}(z^\top M z) = 2(\|M\|_F^2 -
    \sum_k M_{kk}^2)` (Avron & Toledo 2011) that the products give for free: with
    :math:`w_i = z_i \odot M z_i`, so that :math:`x_i = \sum_k w_{ik}` and
    :math:`\mathrm{Var}(w_{ik}) = \sum_{j \ne k} M_{kj}^2`,

    .. math:: \hat\sigma^2 = \frac{2}{n-1} \sum_{i=1}^n \|w_i - \bar w\|^2 .

    Why: an outlier eigenvalue makes the :math:`x_i` heavy-tailed, and their sample variance is
    small exactly when the rare large :math:`x_i` are missing, i.e. when the mean is low; on
    the spectrum {30, 29 values in [0, 1]} the sample-variance t-interval covers 87-91% at
    n = 20-60. :math:`\hat\sigma^2` pools ``d`` coordinates and sees the outlier in every
    product; with it the interval covers about 95% there. The interval assumes Rademacher
    probes (used here), a symmetric :math:`A` (for a non-symmetric one :math:`\hat\sigma^2`
    over-estimates the variance, so the interval is conservative), and a mean of the
    ``samples`` close enough to normal for a t quantile (ten or more samples). For
    ``"hutch++"`` it holds given the sketch; when the sketch spans the whole space the remainder
    is zero and only the round-off allowance is left.

    With ``target_stderr``, sampling stops at the first check (one per block of probes) with at
    least ``MIN_SAMPLES`` (20) samples and a standard error at most the target. Stopping when
    the variance looks small biases the mean low; the variance estimate above and the minimum
    keep the bias small (coverage about 95% on the outlier spectrum, where stopping on the
    sample variance covers 81-87%).

    Args:
        A: Operator or dense tensor ``(d, d)``.
        budget: Most products to spend (``>= 2``; ``>= 4`` for hutch++).
        method: ``"hutch++"``, ``"hutchinson"`` or ``"exact"``.
        target_stderr: Stop early once the standard error is at most this (see above);
            ``converged=False`` if the budget ends first.
        seed: Seed of the probes.
        block_size: Probes per pass over the data.
        progress: Show a progress bar.

    Returns:
        TraceResult.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> trace(A, method="exact").value
        55.0
        >>> trace(A, budget=20, method="hutchinson").value  # exact for a diagonal matrix
        55.0
    """
    if method not in METHODS:
        raise ValueError(f"trace: method must be one of {METHODS}, got {method!r}.")
    op = Counted(A, progress, A.shape[0] if method == "exact" else budget, "trace")
    try:
        if method == "exact":
            value = sum(_sum_and_size(E * AE)[0] for E, AE in _identity_blocks(op, block_size))
            return TraceResult(value, 0.0, (value, value), op.n, method)
        _need(budget, 2 if method == "hutchinson" else 4, method)
        gen = generator(seed)
        Q, exact, size = None, 0.0, 0.0
        if method == "hutch++":
            Q, AQ = _sketch(op, gen, budget)
            exact, size = _sum_and_size(Q * AQ)
        spread = _sample_trace(op, gen, budget, block_size, Q, target_stderr)
        converged = target_stderr is None or spread.stderr <= target_stderr
        lo, hi = _t_interval(spread.mean, spread.stderr, spread.n)
        pad = _roundoff(op, size + spread.size)
        ci = (exact + lo - pad, exact + hi + pad)
        value = exact + spread.mean
        return TraceResult(value, spread.stderr, ci, op.n, method, converged, spread.n)
    finally:
        op.close()


def frobenius_norm(
    A: Any,
    budget: int = 100,
    *,
    method: str = "hutch++",
    seed: int = 0,
    block_size: int = 10,
    progress: bool = False,
) -> FrobeniusResult:
    r"""Estimate the Frobenius norm :math:`\|A\|_F` from matrix-vector products.

    Hutchinson's estimator on :math:`A^\top A`: for Rademacher probes
    :math:`\mathbb E\|Az\|^2 = \mathrm{tr}(A^\top A) = \|A\|_F^2`, one product per sample and
    no product with :math:`A^\top`. ``"hutch++"`` (the Hutch++ split of Meyer, Musco, Musco &
    Woodruff 2021) sketches :math:`Q = \mathrm{orth}(AS)` with a third of the budget and uses
    the exact identity, for any orthonormal :math:`Q` and :math:`P = I - QQ^\top`,

    .. math:: \|A\|_F^2 = \|AQ\|_F^2 + \|AP\|_F^2,

    computing :math:`\|AQ\|_F^2` exactly (a third) and :math:`\|AP\|_F^2 = \mathbb E\|APz\|^2`
    by sampling (the rest). For a symmetric :math:`A`, such as a curvature matrix, :math:`Q`
    holds its largest eigenvalues and the remainder is small; for a non-symmetric one the
    estimate stays unbiased, with less variance reduction. ``"exact"`` sums
    :math:`\|Ae_i\|^2` (``d`` products).

    The interval for :math:`\|A\|_F^2` is Hall's (1992, "On the removal of skewness by
    transformation") skewness-corrected t-interval of the samples :math:`\|APz_i\|^2`: they are
    non-negative and right-skewed (more so without deflation), where the plain t-interval covers
    about 90% at n = 20 on the spectrum {30, 29 values in [0, 1]} and Hall's about 95%. (The
    variance estimate ``trace`` uses would need :math:`z \odot A^\top A z`, a second product per
    sample.) It assumes the skewness-corrected mean is close to normal: with 20 or more samples
    it covered 93-96% in the tests (92-95% with 10); for ``"hutch++"`` it holds given the
    sketch, and a sketch that spans the whole space leaves only a round-off allowance.

    Args:
        A: Operator or dense tensor ``(d, d)``.
        budget: Most products to spend (``>= 2``; ``>= 4`` for hutch++).
        method: ``"hutch++"``, ``"hutchinson"`` or ``"exact"``.
        seed: Seed of the probes.
        block_size: Probes per pass over the data.
        progress: Show a progress bar.

    Returns:
        FrobeniusResult: the norm, with the unbiased estimate of its square in ``squared``.

    Example:
        >>> A = torch.diag(torch.tensor([3.0, 4.0], dtype=torch.float64))
        >>> frobenius_norm(A, method="exact").value
        5.0
        >>> frobenius_norm(A, budget=10, method="hutchinson").value  # exact for a diagonal A
        5.0
    """
    if method not in METHODS:
        raise ValueError(f"frobenius_norm: method must be one of {METHODS}, got {method!r}.")
    op = Counted(A, progress, A.shape[0] if method == "exact" else budget, "frobenius_norm")
    try:
        if method == "exact":
            sq = sum(_sum_squares(AE) for _, AE in _identity_blocks(op, block_size))
            return _norm_of(TraceResult(sq, 0.0, (sq, sq), op.n, method))
        _need(budget, 2 if method == "hutchinson" else 4, f"frobenius_norm({method})")
        gen = generator(seed)
        Q, exact = None, 0.0
        if method == "hutch++":
            Q, AQ = _sketch(op, gen, budget)
            exact = _sum_squares(AQ)
        parts = [
            (AZ.double() ** 2).sum(0).cpu() for _, AZ in _probes(op, gen, budget, block_size, Q)
        ]
        xs = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
        mean, se, (lo, hi) = _skew_t_interval(xs)
        pad = _roundoff(op, exact + mean)
        ci = (exact + lo - pad, exact + hi + pad)
        return _norm_of(TraceResult(exact + mean, se, ci, op.n, method, True, xs.numel()))
    finally:
        op.close()


def block_traces(
    A: Any,
    budget: int = 100,
    *,
    by: str = "module",
    groups: Any = None,
    seed: int = 0,
    block_size: int = 32,
) -> dict[str, TraceResult]:
    r"""Traces of every diagonal block of ``A`` from one sweep of shared probes.

    For a Rademacher probe :math:`z`, :math:`z_b^\top (Az)_b` is an unbiased estimate of
    :math:`\mathrm{tr}(A_{bb})` for every block :math:`b` at once, so all blocks together cost
    ``budget`` products, not ``budget`` per block.

    Args:
        A: Operator with a parameter layout (``A.space``), e.g. a ``HessianOperator``.
        budget: Probes (products), ``>= 2``.
        by: ``"module"``, ``"param"`` or ``"block"`` (see ``ParamSpace.blocks``).
        groups: User groups ``{name: names, prefixes or globs}`` instead of ``by``.
        seed: Seed of the probes.
        block_size: Probes per pass over the data.

    Returns:
        ``{block name: TraceResult}`` (Hutchinson estimates with standard errors).
    """
    if getattr(A, "space", None) is None:
        raise ValueError("block_traces: the operator has no parameter layout (A.space).")
    _need(budget, 2, "block_traces")
    op, gen, groups = Counted(A), generator(seed), A.space.blocks(by, groups)
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


def _sample_trace(op, gen, budget, block_size, Q, target) -> _Spread:
    """Hutchinson samples of ``PAP`` until the budget ends or ``target`` is met (see trace)."""
    spread = _Spread()
    for Z, AZ in _probes(op, gen, budget, block_size, Q):
        spread.add(Z * _deflate(AZ, Q))  # w_i = z_i * (PAP z_i), summing to z_i^T PAP z_i
        if target is not None and spread.n >= MIN_SAMPLES and spread.stderr <= target:
            break
    return spread


class _Spread:
    r"""Running mean of the columns :math:`w_i` and :math:`\sum_i \|w_i - \bar w\|^2` (float64).

    Welford's update in float64, one column at a time (memory: a few ``d``-vectors), accurate
    also where :math:`w_i \approx \bar w`, as for a nearly diagonal matrix.
    """

    def __init__(self) -> None:
        self.n, self.w, self.m2 = 0, None, 0.0

    def add(self, W: torch.Tensor) -> None:
        for w in W.T:
            w = w.double()
            if self.w is None:
                self.w = torch.zeros_like(w)
            self.n += 1
            delta = w - self.w
            self.w += delta / self.n
            self.m2 += float(delta @ w.sub_(self.w))

    @property
    def mean(self) -> float:
        r""":math:`\bar x = \sum_k \bar w_k`."""
        return float(self.w.sum()) if self.n else 0.0

    @property
    def stderr(self) -> float:
        r""":math:`\hat\sigma / \sqrt n` (see ``trace``); 0 without samples."""
        if self.n < 2:
            return 0.0 if self.n == 0 else math.inf
        return math.sqrt(2 * self.m2 / (self.n - 1) / self.n)

    @property
    def size(self) -> float:
        r""":math:`\sum_k |\bar w_k|`, the magnitude of what each sample sums."""
        return float(self.w.abs().sum()) if self.n else 0.0


def _sketch(op: Counted, gen: torch.Generator, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hutch++'s ``Q = orth(A S)`` (at most ``d`` columns: more would span nothing new), ``AQ``."""
    Q = torch.linalg.qr(op(rademacher(gen, op.d, min(budget // 3, op.d), op))).Q
    return Q, op(Q)


def _probes(
    op: Counted, gen: torch.Generator, budget: int, block_size: int, Q: torch.Tensor | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Blocks of Rademacher probes ``Z`` and ``A P Z`` (``P = I - QQ^T``) until the budget ends."""
    if Q is not None and Q.shape[1] == op.d:
        return  # P = 0: the sketch is exact and samples would add nothing
    while op.n < budget:
        Z = rademacher(gen, op.d, min(block_size, budget - op.n), op)
        yield Z, op(_deflate(Z, Q))


def _deflate(V: torch.Tensor, Q: torch.Tensor | None) -> torch.Tensor:
    return V if Q is None else V - Q @ (Q.T @ V)


def _t_interval(mean: float, se: float, n: int) -> tuple[float, float]:
    half = float(stats.t.ppf(0.975, n - 1)) * se if n >= 2 else se
    return mean - half, mean + half


def _skew_t_interval(x: torch.Tensor) -> tuple[float, float, tuple[float, float]]:
    r"""Mean, standard error and Hall's (1992) skewness-corrected 95% interval of ``x`` (n,).

    With :math:`a = \hat\gamma / \sqrt n` (:math:`\hat\gamma` the sample skewness), the
    studentized mean :math:`T` is mapped by the monotone
    :math:`g(T) = T + aT^2/3 + a^2T^3/27 + a/6`, which removes the :math:`n^{-1/2}` skewness
    term of its Edgeworth expansion; the interval is
    :math:`[\bar x - \mathrm{se}\, g^{-1}(q),\ \bar x - \mathrm{se}\, g^{-1}(-q)]`.
    """
    n = x.numel()
    if n < 2:
        mean, se = float(x.sum()), (0.0 if n == 0 else math.inf)
        return mean, se, _t_interval(mean, se, n)
    mean, sd = float(x.mean()), float(x.std())
    se = sd / math.sqrt(n)
    q = float(stats.t.ppf(0.975, n - 1))
    a = float(((x - mean) ** 3).mean()) / sd**3 / math.sqrt(n) if sd > 0 else 0.0
    if abs(a) < 1e-8:
        return mean, se, (mean - q * se, mean + q * se)

    def g_inv(y: float) -> float:
        u = 1 + a * (y - a / 6)
        return 3 / a * (math.copysign(abs(u) ** (1 / 3), u) - 1)

    return mean, se, (mean - se * g_inv(q), mean - se * g_inv(-q))


def _column_squares(V: torch.Tensor) -> torch.Tensor:
    """``||v_i||^2`` of each column, accumulated in float64, on the CPU."""
    return (torch.linalg.vector_norm(V, dim=0, dtype=torch.float64) ** 2).cpu()


def _sum_and_size(X: torch.Tensor) -> tuple[float, float]:
    """``sum(X)`` and ``sum(|X|)``, accumulated in float64."""
    return float(X.sum(dtype=torch.float64)), float(X.abs().sum(dtype=torch.float64))


def _sum_squares(V: torch.Tensor) -> float:
    return float(_column_squares(V).sum())


def _norm_of(squared: TraceResult) -> FrobeniusResult:
    value = math.sqrt(max(squared.value, 0.0))
    stderr = squared.stderr / (2 * value) if value > 0 else 0.0
    lo, hi = (math.sqrt(max(c, 0.0)) for c in squared.ci95)
    return FrobeniusResult(value, stderr, (lo, hi), squared.n_matvecs, squared)


def _roundoff(op: Counted, size: float) -> float:
    """Round-off allowance of a sum of ``d`` terms of total magnitude ``size``: ``sqrt(d) eps``."""
    return math.sqrt(op.d) * torch.finfo(op.dtype).eps * size


def _identity_blocks(op: Counted, block_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Blocks ``E`` of identity columns and their products ``A E`` (``d`` products in all)."""
    for i in range(0, op.d, block_size):
        E = torch.zeros(op.d, min(block_size, op.d - i), dtype=op.dtype, device=op.device)
        E[torch.arange(i, i + E.shape[1]), torch.arange(E.shape[1])] = 1
        yield E, op(E)


def _need(budget: int, least: int, what: str) -> None:
    if budget < least:
        raise ValueError(f"{what}: budget must be at least {least} products, got {budget}.")
