"""Stochastic trace and diagonal estimators with standard errors (Hutchinson, Hutch++)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..operators.base import Operator
from ._util import Counted, generator, rademacher, t_interval

METHODS = ("hutch++", "hutchinson", "exact")
MIN_SAMPLES = 20  # fewest probes before target_stderr may stop sampling (see trace)

_Probes = Iterator[tuple[torch.Tensor, torch.Tensor]]  # blocks of probes Z and products A P Z


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
class DiagonalResult:
    r"""An estimate of ``diag(A)``: ``value`` and ``stderr`` of shape ``(d,)``, ``n_matvecs``.

    ``product_error``: the products' error per unit input :math:`e` (finite differences; 0 for
    exact products). Each entry may then be off by up to :math:`e\sqrt d` beyond its sampling
    error (:math:`|z_i (E z)_i| \le \|E z\| \le e \|z\|`), which ``bias_bound`` holds.
    """

    value: torch.Tensor
    stderr: torch.Tensor
    n_matvecs: int
    product_error: float = 0.0
    bias_bound: float = 0.0


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
    sample = functools.partial(_sample_trace, target=target_stderr)
    return _estimate(
        A, budget, "trace", method, seed, block_size, progress, exact=_forms, sample=sample
    )


def block_traces(
    A: Operator,
    budget: int = 100,
    *,
    by: str = "module",
    groups: Any = None,
    seed: int = 0,
    block_size: int = 32,
) -> dict[str, TraceResult]:
    r"""Traces of every diagonal block of ``A`` from one sweep of shared probes.

    For a Rademacher probe :math:`z`, :math:`x_b = z_b^\top (Az)_b` is an unbiased estimate of
    :math:`\mathrm{tr}(A_{bb})` for every block :math:`b` at once, so all blocks together cost
    ``budget`` products, not ``budget`` per block.

    Each interval is ``trace``'s (see there), with the variance estimate :math:`\hat\sigma_b^2`
    formed from the block's coordinates :math:`w_k = z_k (Az)_k`, :math:`k \in b`; the sample
    variance of the :math:`x_b` would undercover on outlier spectra as it does for ``trace``.
    For a symmetric :math:`A`,
    :math:`\mathrm{Var}(x_b) = 2\sum_{k \ne j \in b} A_{kj}^2 + \sum_{k \in b, j \notin b} A_{kj}^2`
    while :math:`\hat\sigma_b^2` estimates :math:`2\sum_{k \in b, j \ne k} A_{kj}^2`: it counts
    the couplings of the block to the rest twice. The interval is then as good as ``trace``'s for a
    block-diagonal :math:`A` and conservative, wider by at most :math:`\sqrt 2`, otherwise.

    Args:
        A: An ``Operator`` with a parameter layout (``A.space``), e.g. a ``HessianOperator``.
        budget: Probes (products), ``>= 2``.
        by: ``"module"``, ``"param"`` or ``"block"`` (see ``ParamSpace.blocks``).
        groups: User groups ``{name: names, prefixes or globs}`` instead of ``by``.
        seed: Seed of the probes.
        block_size: Probes per pass over the data.

    Returns:
        ``{block name: TraceResult}`` (Hutchinson estimates with standard errors).

    Raises:
        ValueError: ``A`` is not an ``Operator`` with a ``space``, or ``budget < 2``.
    """
    if not isinstance(A, Operator) or A.space is None:
        what = type(A).__name__ if not isinstance(A, Operator) else f"{A!r} with space=None"
        raise ValueError(
            f"block_traces: expected an Operator with a parameter layout (space), got {what}. "
            "Pass a model operator (HessianOperator, GGNOperator, ...) or "
            "DenseOperator(matrix, space=ParamSpace(names, shapes))."
        )
    _need(budget, 2, "block_traces")
    op, gen = Counted(A), generator(seed)
    blocks, slices = A.space.blocks(by, groups), A.space.slices()
    spreads = {name: _Spread(op) for name in blocks}
    for Z, AZ in _probes(op, gen, budget, block_size, None):
        W = Z * AZ
        for name, names in blocks.items():
            spreads[name].add(torch.cat([W[slices[n]] for n in names]))
    return {name: _result(op, "hutchinson", 0.0, 0.0, s.summary()) for name, s in spreads.items()}


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
    X = torch.cat([Z * AZ for Z, AZ in _probes(op, gen, budget, block_size, None)], 1)
    bias = op.error * op.dim**0.5  # approximate products: |z_i (E z)_i| <= e ||z||
    return DiagonalResult(X.mean(1), X.std(1) / X.shape[1] ** 0.5, op.n, op.error, bias)


@dataclass(frozen=True)
class _Sampled:
    """The sampled part of a trace estimate: mean, standard error, 95% interval, samples.

    ``size`` is the magnitude of the terms each sample sums (for the round-off allowance).
    """

    mean: float
    stderr: float
    ci95: tuple[float, float]
    size: float
    n: int
    converged: bool = True


def _estimate(
    A: Any,
    budget: int,
    who: str,
    method: str,
    seed: int,
    block_size: int,
    progress: bool,
    *,
    exact: Callable[[Counted, torch.Tensor, torch.Tensor], tuple[float, float]],
    sample: Callable[[Counted, _Probes, torch.Tensor | None], _Sampled],
    squares: bool = False,
) -> TraceResult:
    r"""The estimator behind ``trace`` and ``frobenius_norm``: :math:`\mathrm{tr}(M)`.

    ``M`` is seen through products with ``A`` (:math:`M = A` or :math:`A^\top A`).
    ``exact(V, AV)`` returns :math:`\mathrm{tr}(V^\top M V)` and the magnitude of its terms, for
    blocks of identity columns (``"exact"``) or Hutch++'s sketch :math:`Q`; ``sample(probes,
    Q)`` estimates the trace of the remainder from the blocks ``(Z, A P Z)`` of Rademacher
    probes (:math:`P = I - QQ^\top`; ``Q`` is None for ``"hutchinson"``). The result adds both,
    and widens the sample's interval by the round-off allowance of the magnitudes summed.
    """
    if method not in METHODS:
        raise ValueError(f"{who}: method must be one of {METHODS}, got {method!r}.")
    op = Counted(A, progress, A.shape[0] if method == "exact" else budget, who)
    try:
        if method == "exact":
            value = sum(exact(op, E, AE)[0] for E, AE in _identity_blocks(op, block_size))
            pad = _product_pad(op, value, squares)
            return TraceResult(value, 0.0, (value - pad, value + pad), op.n, method)
        _need(budget, 2 if method == "hutchinson" else 4, f"{who}({method})")
        gen = generator(seed)
        Q, known, size = None, 0.0, 0.0
        if method == "hutch++":
            Q, AQ = _sketch(op, gen, budget)
            known, size = exact(op, Q, AQ)
        probes = _probes(op, gen, budget, block_size, Q)
        return _result(op, method, known, size, sample(op, probes, Q), squares)
    finally:
        op.close()


def _product_pad(op: Counted, value: float, squares: bool) -> float:
    r"""How far approximate products (error :math:`e` per unit input) move one estimate.

    A trace sums ``d`` unit forms (identity columns) or probe forms :math:`z^\top \tilde A z`
    with :math:`\|z\|^2 = d`: at most :math:`d e` off. A squared norm sums
    :math:`\|\tilde A v\|^2`, each at most :math:`e\|v\|(2\|\tilde A v\| + e\|v\|)` off:
    by Cauchy-Schwarz at most :math:`2e\sqrt{d\,T} + d e^2` for a total ``T``.
    """
    d, e = op.dim, op.error
    return 2 * e * (d * abs(value)) ** 0.5 + d * e * e if squares else d * e


def _result(
    op: Counted, method: str, known: float, size: float, s: _Sampled, squares: bool = False
) -> TraceResult:
    """``known + s`` as a ``TraceResult``, its interval widened by the round-off allowance."""
    # approximate products move the sketch's part and the samples' part each (see _product_pad)
    pad = _roundoff(op, size + s.size) + 2 * _product_pad(op, abs(known) + abs(s.mean), squares)
    ci = (known + s.ci95[0] - pad, known + s.ci95[1] + pad)
    return TraceResult(known + s.mean, s.stderr, ci, op.n, method, s.converged, s.n)


def _forms(op: Counted, V: torch.Tensor, AV: torch.Tensor) -> tuple[float, float]:
    r""":math:`\mathrm{tr}(V^\top A V)` and the magnitude of its terms (float64)."""
    X = V * AV
    value = op.total(X.sum(dtype=torch.float64))
    return float(value), float(op.total(X.abs().sum(dtype=torch.float64)))


def _sample_trace(
    op: Counted, probes: _Probes, Q: torch.Tensor | None, target: float | None
) -> _Sampled:
    """Hutchinson samples of ``PAP`` until the probes end or ``target`` is met (see trace)."""
    spread = _Spread(op)
    for Z, APZ in probes:
        spread.add(Z * _deflate(APZ, Q, op))  # w_i = z_i * (PAP z_i), summing to z_i^T PAP z_i
        if target is not None and spread.n >= MIN_SAMPLES and spread.stderr <= target:
            break
    return spread.summary(converged=target is None or spread.stderr <= target)


class _Spread:
    r"""Running mean of the columns :math:`w_i` and :math:`\sum_i \|w_i - \bar w\|^2` (float64).

    Welford's update in float64, one column at a time (memory: a few ``d``-vectors), accurate
    also where :math:`w_i \approx \bar w`, as for a nearly diagonal matrix. The columns added are
    only read. Its sums over entries run over all processes when ``op``'s vectors are shards.
    """

    def __init__(self, op: Counted) -> None:
        self.op, self.n, self.m2 = op, 0, 0.0
        self.w: torch.Tensor | None = None

    def add(self, W: torch.Tensor) -> None:
        for w in W.T:
            w = w.double()
            if self.w is None:
                self.w = torch.zeros_like(w)
            self.n += 1
            delta = w - self.w
            self.w += delta / self.n
            self.m2 += float(self.op.total(delta @ (w - self.w)))

    @property
    def mean(self) -> float:
        r""":math:`\bar x = \sum_k \bar w_k`."""
        return float(self.op.total(self.w.sum())) if self.w is not None else 0.0

    @property
    def stderr(self) -> float:
        r""":math:`\hat\sigma / \sqrt n` (see ``trace``); 0 without samples."""
        if self.n < 2:
            return 0.0 if self.n == 0 else math.inf
        return math.sqrt(2 * self.m2 / (self.n - 1) / self.n)

    @property
    def size(self) -> float:
        r""":math:`\sum_k |\bar w_k|`, the magnitude of what each sample sums."""
        return float(self.op.total(self.w.abs().sum())) if self.w is not None else 0.0

    def summary(self, converged: bool = True) -> _Sampled:
        """Mean, standard error and t-interval (see ``trace``)."""
        mean, se = self.mean, self.stderr
        return _Sampled(mean, se, t_interval(mean, se, self.n), self.size, self.n, converged)


def _sketch(op: Counted, gen: torch.Generator, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hutch++'s ``Q = orth(A S)`` (at most ``d`` columns: more would span nothing new), ``AQ``."""
    Q = _orth(op, op(rademacher(gen, op.d, min(budget // 3, op.dim), op)))
    return Q, op(Q)


def _orth(op: Counted, Y: torch.Tensor) -> torch.Tensor:
    r"""An orthonormal basis of the columns of ``Y``: QR, or for shards Cholesky-QR twice.

    Sharded columns have no local QR; their Gram matrix (summed over the processes) gives
    :math:`Q = Y U \Lambda^{-1/2}` from :math:`Y^\top Y = U \Lambda U^\top`, repeated once to
    orthonormality at round-off (CholQR2: Fukaya et al. 2014); directions with
    :math:`\lambda \le \varepsilon \lambda_{\max}` are dropped (a rank-deficient sketch).
    """
    if op.shard is None:
        return torch.linalg.qr(Y).Q
    for _ in range(2):
        lam, U = torch.linalg.eigh(op.dot(Y, Y).double().cpu())
        keep = lam > lam.max().clamp_min(1e-300) * torch.finfo(Y.dtype).eps
        Y = Y @ (U[:, keep] / lam[keep].sqrt()).to(Y)
    return Y


def _probes(
    op: Counted, gen: torch.Generator, budget: int, block_size: int, Q: torch.Tensor | None
) -> _Probes:
    """Blocks of Rademacher probes ``Z`` and ``A P Z`` (``P = I - QQ^T``) until the budget ends."""
    if Q is not None and Q.shape[1] == op.dim:
        return  # P = 0: the sketch is exact and samples would add nothing
    while op.n < budget:
        Z = rademacher(gen, op.d, min(block_size, budget - op.n), op)
        yield Z, op(_deflate(Z, Q, op))


def _deflate(V: torch.Tensor, Q: torch.Tensor | None, op: Counted) -> torch.Tensor:
    return V if Q is None else V - Q @ op.dot(Q, V)


def _column_squares(V: torch.Tensor, op: Counted) -> torch.Tensor:
    """``||v_i||^2`` of each column (over all shards), accumulated in float64, on the CPU."""
    return op.total(torch.linalg.vector_norm(V, dim=0, dtype=torch.float64) ** 2).cpu()


def _roundoff(op: Counted, size: float) -> float:
    """Round-off allowance of a sum of ``d`` terms of total magnitude ``size``: ``sqrt(d) eps``."""
    return math.sqrt(op.dim) * torch.finfo(op.dtype).eps * size


def _identity_blocks(op: Counted, block_size: int) -> _Probes:
    """Blocks ``E`` of identity columns and their products ``A E`` (``d`` products in all)."""
    for i in range(0, op.dim, block_size):
        E = torch.zeros(op.dim, min(block_size, op.dim - i), dtype=op.dtype, device=op.device)
        E[torch.arange(i, i + E.shape[1]), torch.arange(E.shape[1])] = 1
        E = op.rows(E)  # a shard's rows of the global identity columns
        yield E, op(E)


def _need(budget: int, least: int, what: str) -> None:
    if budget < least:
        raise ValueError(f"{what}: budget must be at least {least} products, got {budget}.")
