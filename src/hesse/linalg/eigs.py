"""Extreme eigenpairs: thick-restart block Lanczos in float64."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..operators._memory import auto_basis_dtype
from ._lanczos import Lanczos, step
from ._lanczos import basis_dtype as storage_dtype
from ._util import Counted, as_operator, dimension, gaussian, generator, require_symmetric

WHICH = ("largest", "smallest", "magnitude", "both")


@dataclass(frozen=True, repr=False)
class EigResult:
    """Eigenpairs and how far to trust them.

    Attributes:
        values: ``(k,)`` float64 Ritz values, ordered as ``which`` asks.
        vectors: ``(d, k)`` orthonormal Ritz vectors (unit norm, normalized in float64), in the
            operator's dtype, or float32 for a half-precision operator.
        residuals: ``(k,)`` float64 bounds on ``||A x - theta x||`` for each pair.
        converged: Whether every residual met the tolerance and the multiplicity check ran.
        n_matvecs: Matrix-vector products used.
        which: The end of the spectrum asked for.
        reason: Why ``converged`` is False (``""`` when it is True).
        basis_dtype: The dtype the Krylov basis was stored in (see ``eigs``'s ``basis_dtype``).
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    converged: bool
    n_matvecs: int
    which: str
    reason: str = ""
    basis_dtype: torch.dtype = torch.float64

    def __repr__(self) -> str:
        def shape(t: torch.Tensor) -> str:
            return f"<{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}>"

        return (
            f"EigResult(values={shape(self.values)}, vectors={shape(self.vectors)}, "
            f"residuals={shape(self.residuals)}, converged={self.converged}, "
            f"n_matvecs={self.n_matvecs}, which={self.which!r}, reason={self.reason!r}, "
            f"basis_dtype={str(self.basis_dtype).removeprefix('torch.')})"
        )


def eigs(
    A: Any,
    k: int = 6,
    *,
    which: str = "largest",
    tol: float | None = None,
    max_matvecs: int | None = None,
    ncv: int | None = None,
    seed: int = 0,
    progress: bool | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    v0: Any = None,
    basis_dtype: torch.dtype | None = None,
) -> EigResult:
    r"""``k`` extreme eigenpairs of a symmetric operator by thick-restart block Lanczos.

    The Krylov basis is fully reorthogonalized (DGKS test) with inner products summed in
    float64, so no ghost copies of an eigenvalue appear whatever the operator's dtype; only the
    products run in the operator's dtype. The basis is stored in float64 for a float64
    operator and in float32 for a float32 (or lower) one, half the memory, where its rounding
    still leaves room in ``tol`` (see ``basis_dtype``). When the basis reaches ``ncv`` vectors
    it restarts from the most wanted Ritz vectors (Wu & Simon 2000, "Thick-restart Lanczos
    method for large symmetric eigenvalue problems"). A Ritz pair :math:`(\theta, x)` is
    accepted when its residual bound :math:`r` (see ``hesse.linalg._lanczos``: it keeps the
    true :math:`\beta`, the measured asymmetry of the products, and one unit of their
    round-off) meets

    .. math:: \|A x - \theta x\| \le r \le \mathrm{tol}\cdot\|A\|,

    with :math:`\|A\|` estimated by the largest :math:`|\theta|` and :math:`\|A q\|` seen.

    A single Krylov sequence sees a multiple eigenvalue only once, so for ``k > 1`` the start is
    a block of two random vectors (Golub & Underwood 1977): it finds a double eigenvalue twice.
    If a returned value still appears twice (within the residual bounds), it may have more
    copies: the returned vectors are then locked and Lanczos runs from a fresh random vector in
    their complement; any eigenvalue it finds beyond the returned ones is swapped in, until
    none is. Like every Krylov method this assumes the random start reaches every wanted
    eigenvector (it does with probability one, and fails only for eigenvectors with a tiny
    component in the start).

    Memory: the basis of ``ncv + b`` vectors of ``d`` entries (``b`` = 1 for ``k = 1``, else
    2), the ``k`` Ritz vectors it ends with (kept, as locked vectors, while the multiplicity
    check runs a basis of ``ncv + 1``), and the products' block: at the peak, ``ncv + 3``
    vectors for ``k = 1``, and ``ncv + max(k + 3, 6)`` for ``k > 1`` (``k + 2`` when no check
    runs), in the basis dtype; norms and inner products are float64 sums over row chunks,
    never a float64 copy of the basis. The operator adds its own: a
    :class:`~hesse.HessianOperator` keeps every batch's gradient graph between products by
    default (``max_cache_bytes="auto"``, while they fit half the free memory), which made
    top-10 runs 1.1-1.35x faster on the benchmark workloads for 84 (transformer) and 22 (MLP)
    MiB; ``HessianOperator(obj, max_cache_bytes=0)`` holds one batch's graph at a time, the
    smallest peak (``benchmarks/RESULTS.md``, "Peak memory of a top-10 run").

    Args:
        A: Symmetric operator ``(d, d)``: a hesse operator, a dense tensor, a numpy array, a
            ``scipy.sparse.linalg.LinearOperator``, or anything with ``shape``, ``dtype``,
            ``device`` and ``@``.
        k: Number of eigenpairs, ``1 <= k <= d``.
        which: ``"largest"`` (descending), ``"smallest"`` (ascending), ``"magnitude"`` (by
            descending absolute value) or ``"both"`` (``ceil(k/2)`` largest and ``floor(k/2)``
            smallest, descending).
        tol: Relative residual tolerance. Default :math:`\max(10^{-10}, 8\varepsilon)` with
            :math:`\varepsilon` the machine epsilon of the operator's dtype (1e-10 in float64,
            9.5e-7 in float32, 7.8e-3 in float16, 6.3e-2 in bfloat16); at least
            :math:`8\varepsilon`, the accuracy that products in that dtype allow.
        max_matvecs: Budget of products; when spent, ``converged=False``. Default
            ``max(1000, 50 k)``.
        ncv: Largest basis before a restart, ``>= k + 2`` (``>= 2`` for ``k = 1``); default
            ``max(2k + 1, 20)``.
        seed: Seed of the random start vectors.
        progress: Progress bar of products out of ``max_matvecs``: True, False, or None (shown
            on a terminal when the run lasts more than a second).
        callback: Called as ``callback(n_matvecs, ritz_values, residual_bounds)`` at each step.
        v0: Warm start: a ``(d,)`` vector, a ``(d, j)`` block, or an earlier :class:`EigResult`.
            Its columns, normalized and summed, make the first start vector (the Krylov space
            of a sum of ``j`` eigenvectors holds all of them after ``j`` products); for
            ``k > 1`` a random vector joins it.
        basis_dtype: Storage of the Krylov basis. None chooses: float32 for products in
            float32 or lower when a float64 basis would take 256 MiB or more and
            :math:`(\varepsilon + \varepsilon_{32}\sqrt{n_{cv}+b}) \le 0.9\,\mathrm{tol}`
            (the default ``tol`` and ``ncv`` are, up to ``k = 17``), else float64 (float32 on
            MPS): a float32 basis can take more products on clustered eigenvalues. Pass
            ``torch.float32`` for a float64 operator where ``hesse.plan`` says a float64
            basis does not fit. Inner
            products and norms stay float64 sums, and a float32 basis adds its storage's
            round-off, :math:`\varepsilon_{32}\sqrt{n}\,\|A\|`, to every bound.

    Returns:
        EigResult: ``values`` ``(k,)`` float64 Ritz values in the order ``which`` asks;
        ``vectors`` ``(d, k)`` orthonormal Ritz vectors (float32 for a half-precision operator,
        else its dtype); ``residuals`` ``(k,)`` bounds on :math:`\|A x - \theta x\|`, each
        at least the true residual up to one unit of the products' round-off; ``converged``,
        True only when every bound is within ``tol`` times :math:`\|A\|` and the
        multiplicity check (when a value appeared twice) ran; ``n_matvecs``, the products
        used; ``which``; ``reason``, why ``converged`` is False (``""`` when True); and
        ``basis_dtype``, the dtype the basis was stored in.

    Raises:
        ValueError: a non-symmetric matrix or an operator not tagged symmetric; an operator
            whose products turn out not symmetric (measured during the run, beyond
            :math:`\sqrt{\varepsilon}\,\|A\|`); ``k`` or ``which`` out of range, ``tol``
            below the floor of the dtype, a budget below ``k``, or ``ncv`` too small.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> r = eigs(A, k=3)
        >>> r.values.round(decimals=9)
        tensor([100.,  99.,  98.], dtype=torch.float64)
        >>> r.converged, r.reason
        (True, '')
    """
    A = as_operator(A)
    require_symmetric(A, "eigs")
    d = dimension(A)
    if which not in WHICH:
        raise ValueError(f"eigs: which must be one of {WHICH}, got {which!r}.")
    if not 1 <= k <= d:
        raise ValueError(f"eigs: k must be between 1 and the dimension {d}, got k={k}.")
    b = min(1 if k == 1 else 2, d)
    if ncv is not None and ncv < k + b:
        raise ValueError(
            f"eigs: ncv={ncv} leaves no room to restart; it must be at least k + {b} = {k + b} "
            f"(the k kept Ritz vectors plus a block of {b} new directions)."
        )
    tol = _tolerance(tol, A.dtype)
    budget = max_matvecs or max(1000, 50 * k)
    if budget < k:
        raise ValueError(f"eigs: max_matvecs={budget} cannot find k={k} eigenpairs; give >= k.")
    if basis_dtype is not None and not basis_dtype.is_floating_point:
        raise ValueError(f"eigs: basis_dtype must be a floating dtype, got {basis_dtype}.")
    op = Counted(A, progress, budget, "eigs")
    m = ncv or max(2 * k + 1, 20)
    op.basis_dtype = basis_dtype or auto_basis_dtype(A.dtype, min(m, d) + b, tol, op.device, dim=d)
    search = _Search(op, which, tol, budget, generator(seed), callback)
    try:
        return search.run(k, b, m, v0)
    finally:
        op.close()


def _tolerance(tol: float | None, dtype: torch.dtype) -> float:
    """The default tolerance of ``dtype``, or ``tol`` checked against its floor."""
    eps, name = torch.finfo(dtype).eps, str(dtype).removeprefix("torch.")
    if tol is None:
        return max(1e-10, 8 * eps)
    if not tol >= 8 * eps:
        raise ValueError(
            f"eigs: tol={tol:g} is below what products in {name} can resolve ({8 * eps:.1e}, "
            f"eight units of round-off); pass tol >= {8 * eps:.1e}, or a float64 operator."
        )
    return float(tol)


@dataclass(frozen=True)
class _Pairs:
    """The Ritz pairs a round of ``_Search`` ends with.

    Attributes:
        values: ``(j,)`` float64 Ritz values.
        vectors: ``(d, j)`` unit Ritz vectors, in the basis dtype.
        bounds: ``(j,)`` float64 bounds on their residuals.
        converged: Whether every bound met the tolerance (and, after ``verify``, whether the
            multiplicity check ran to its end).
        anorm: The estimate of ``||A||`` the tolerance was relative to.
    """

    values: torch.Tensor
    vectors: torch.Tensor
    bounds: torch.Tensor
    converged: bool
    anorm: float


class _Search:
    """The Lanczos rounds of one ``eigs`` call.

    Args:
        op: The counted operator.
        which: The end of the spectrum asked for (one of ``WHICH``).
        tol: Relative residual tolerance.
        budget: Most products in all rounds together.
        gen: Generator of the random start vectors.
        callback: ``callback(n_matvecs, ritz_values, residual_bounds)`` at each step, or None.
    """

    def __init__(
        self,
        op: Counted,
        which: str,
        tol: float,
        budget: int,
        gen: torch.Generator,
        callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None,
    ):
        self.op, self.which, self.tol, self.budget = op, which, tol, budget
        self.gen, self.callback = gen, callback

    def run(self, k: int, b: int, m: int, v0: Any) -> EigResult:
        """``k`` pairs from a start block of ``b`` vectors, restarting at ``m`` basis vectors."""
        lz = Lanczos(self.op, min(m, self.op.dim), self._start(v0, b), self.gen)
        found, reason = self.round(lz, k, m), ""
        del lz  # its basis, before a check round builds another
        if not found.converged:
            met = int((found.bounds <= self.tol * found.anorm).sum())
            reason = (
                f"budget of {self.budget} products spent: {met} of {k} pairs within tol"
                if self.op.n >= self.budget
                else f"the Krylov space is exhausted, and {met} of {k} pairs within tol: the "
                "products are not accurate (or symmetric) enough for tol"
            )
        elif k > 1 and _repeated(found.values, found.bounds, b):
            found = self.verify(found, k, m)
            if not found.converged:
                reason = (
                    f"all {k} pairs within tol but the budget of {self.budget} products ran "
                    "out before the multiplicity check"
                )
        vals, order = found.values, _priority(found.values, self.which)[:k]
        if self.which == "both":
            order = order[torch.argsort(vals[order], descending=True)]
        vectors = found.vectors[:, order].to(torch.promote_types(self.op.dtype, torch.float32))
        bounds, n, stored = found.bounds[order], self.op.n, found.vectors.dtype
        return EigResult(
            vals[order], vectors, bounds, found.converged, n, self.which, reason, stored
        )

    def round(self, lz: Lanczos, nev: int, m: int) -> _Pairs:
        """Iterate ``lz`` until its ``nev`` most wanted Ritz pairs meet the tolerance.

        Stops early when the budget or the space runs out (``converged=False``); restarts when
        the basis would exceed ``m`` vectors. The pairs come most wanted first.
        """
        while True:
            theta, S, bounds = lz.ritz()
            order = _priority(theta, self.which)
            want = order[:nev]
            met = bounds[want] <= self.tol * lz.anorm
            ok = len(want) == nev and bool(met.all())
            if self.callback is not None and lz.n:
                self.callback(self.op.n, theta[want], bounds[want])
            if ok or (lz.b == 0 and not lz.append()) or self.op.n >= self.budget:
                return _Pairs(theta[want], lz.vectors(S[:, want]), bounds[want], ok, lz.anorm)
            if lz.n + lz.b > m:
                lz.restart(theta, S, order[: _kept(m, lz.b, nev, int(met.sum()))])
            lz.shrink(min(lz.b, self.budget - self.op.n))
            step([lz], self.op)

    def verify(self, found: _Pairs, k: int, m: int) -> _Pairs:
        """Search the complement of ``found`` for an eigenvalue beyond the returned ones.

        Returns:
            The ``k`` most wanted pairs of ``found`` and of the complement, ``converged=False``
            when the budget ran out before the check ended.
        """
        while found.vectors.shape[1] < self.op.dim:
            extra = self._complement(found.vectors, m, found.anorm)
            if not extra.converged:
                return replace(found, converged=False, anorm=extra.anorm)
            allv, margin = torch.cat([found.values, extra.values]), self.tol * extra.anorm
            keep, old = _priority(allv, self.which)[:k].tolist(), len(found.values)
            new = [i for i in keep if i >= old]
            dropped = [j for j in range(old) if j not in keep]
            # the new pairs take the dropped ones' places in place: no copy of the k vectors
            slots = [j if j in keep else new[dropped.index(j)] for j in range(old)]
            X = found.vectors
            for j, i in zip(dropped, new, strict=True):
                X[:, j] = extra.vectors[:, i - old]
            bounds = torch.cat([found.bounds, extra.bounds])[slots]
            found = _Pairs(allv[slots], X, bounds, True, extra.anorm)
            if all(abs(float(allv[i] - allv[j])) <= margin for i in new for j in dropped):
                break
        return found

    def _complement(self, X: torch.Tensor, m: int, anorm: float) -> _Pairs:
        """The most wanted pair(s) of ``A`` on the complement of ``X``, from a random start."""
        room = self.op.dim - X.shape[1]
        start = gaussian(self.gen, self.op.d, 1, self.op, X.dtype)
        lz = Lanczos(self.op, min(m, room), start, self.gen, locked=X, anorm=anorm)
        del start  # copied into the basis
        return self.round(lz, min(2 if self.which == "both" else 1, room), m)

    def _start(self, v0: Any, b: int) -> torch.Tensor:
        """``(d, b)`` start block: the warm start (if any), then random vectors."""
        d, dtype = self.op.d, storage_dtype(self.op.device, self.op.basis_dtype)
        cols = [] if v0 is None else [_combined(v0, self.op, dtype)]
        while len(cols) < b:
            cols.append(gaussian(self.gen, d, 1, self.op, dtype)[:, 0])
        return torch.stack(cols, 1)


def _combined(v0: Any, op: Counted, dtype: torch.dtype) -> torch.Tensor:
    """The sum of the normalized columns of a warm start (vector, block or EigResult)."""
    V = torch.as_tensor(v0.vectors if isinstance(v0, EigResult) else v0)
    V, d = V.to(device=op.device, dtype=dtype), op.d
    V = V[:, None] if V.dim() == 1 else V
    if V.dim() != 2 or V.shape[0] != d or V.shape[1] == 0:
        raise ValueError(
            f"eigs: v0 must be a ({d},) vector, a ({d}, j) block or an EigResult of the same "
            f"operator, got shape {tuple(V.shape)}."
        )
    return (V / op.norm(V, dim=0).clamp_min(1e-300)).sum(1)


def _repeated(theta: torch.Tensor, bounds: torch.Tensor, b: int) -> bool:
    """Whether some value appears ``b`` times or more, within the residual bounds."""
    close = (theta[:, None] - theta[None, :]).abs() <= bounds[:, None] + bounds[None, :]
    return int(close.sum(1).max()) >= b


def _kept(m: int, b: int, nev: int, nconv: int) -> int:
    """Ritz vectors kept at a restart, as ARPACK's ``dsaup2`` keeps them.

    The wanted ones, plus one for each converged one up to half of the rest, and half the basis
    when one is wanted (Lehoucq, Sorensen & Yang 1998): kept converged pairs no longer slow the
    others down.
    """
    p = nev + min(nconv, (m - nev) // 2)
    return min(m - b, m // 2 if p == 1 else p)


def _priority(theta: torch.Tensor, which: str) -> torch.Tensor:
    """Indices of ``theta`` from most to least wanted."""
    if which == "largest":
        return torch.argsort(theta, descending=True)
    if which == "smallest":
        return torch.argsort(theta)
    if which == "magnitude":
        return torch.argsort(theta.abs(), descending=True)
    hi, lo = torch.argsort(theta, descending=True), torch.argsort(theta)
    seen, out = set(), []
    for i in torch.stack([hi, lo], 1).reshape(-1).tolist():
        if i not in seen:
            seen.add(i)
            out.append(i)
    return torch.tensor(out, dtype=torch.long)
