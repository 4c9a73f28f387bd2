"""Extreme eigenpairs: thick-restart Lanczos with full reorthogonalization, and power iteration."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ._util import Counted, gaussian, generator

WHICH = ("largest", "smallest", "magnitude", "both")


@dataclass(frozen=True)
class EigResult:
    """Eigenpairs and how far to trust them.

    Attributes:
        values: ``(k,)`` float64 Ritz values, ordered as ``which`` asks.
        vectors: ``(d, k)`` orthonormal Ritz vectors, in the operator's dtype.
        residuals: ``(k,)`` float64 bounds on ``||A x - theta x||`` for each pair.
        converged: Whether every residual met the tolerance.
        n_matvecs: Matrix-vector products used.
        which: The end of the spectrum asked for.
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    converged: bool
    n_matvecs: int
    which: str


def eigs(
    A: Any,
    k: int = 6,
    *,
    which: str = "largest",
    tol: float | None = None,
    max_matvecs: int | None = None,
    ncv: int | None = None,
    seed: int = 0,
    progress: bool = False,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> EigResult:
    r"""``k`` extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

    The Krylov basis is fully reorthogonalized (twice, classical Gram-Schmidt), so no ghost
    copies of converged eigenvalues appear; the projected matrix is kept and diagonalized in
    float64. When the basis reaches ``ncv`` vectors it restarts from the wanted Ritz vectors
    (Wu & Simon 2000, "Thick-restart Lanczos method for large symmetric eigenvalue problems").
    A pair is accepted when its residual bound meets

    .. math:: |\beta_m s_{m,i}| \le \mathrm{tol}\cdot\max_j |\theta_j|.

    For ``k > 1`` the result is then verified: the converged vectors are locked and Lanczos
    runs again from a fresh random vector orthogonal to them; any eigenvalue it finds beyond
    the returned ones (a multiple eigenvalue, which a single Krylov sequence sees only once)
    is swapped in, until none is found.

    Args:
        A: Symmetric operator or dense tensor of shape ``(d, d)``.
        k: Number of eigenpairs, ``1 <= k <= d``.
        which: ``"largest"`` (descending), ``"smallest"`` (ascending), ``"magnitude"`` (by
            descending absolute value) or ``"both"`` (``ceil(k/2)`` largest and ``floor(k/2)``
            smallest, descending).
        tol: Relative residual tolerance; default 1e-6 in float32, 1e-10 in float64.
        max_matvecs: Budget of products; when spent, ``converged=False``. Default
            ``max(1000, 50 k)``.
        ncv: Largest basis before a restart; default ``max(2k + 1, 20)``.
        seed: Seed of the random start vectors.
        progress: Show a progress bar of products.
        callback: Called as ``callback(n_matvecs, ritz_values, residual_bounds)`` at each check.

    Returns:
        EigResult.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> eigs(A, k=3).values
        tensor([100.,  99.,  98.], dtype=torch.float64)
    """
    d = A.shape[0]
    if which not in WHICH:
        raise ValueError(f"eigs: which must be one of {WHICH}, got {which!r}.")
    if not 1 <= k <= d:
        raise ValueError(f"eigs: k must be between 1 and the dimension {d}, got k={k}.")
    if ncv is not None and not k < ncv:
        raise ValueError(f"eigs: ncv (the largest basis) must exceed k={k}, got ncv={ncv}.")
    tol = tol if tol is not None else (1e-10 if A.dtype == torch.float64 else 1e-6)
    budget = max_matvecs or max(1000, 50 * k)
    if budget < k:
        raise ValueError(f"eigs: max_matvecs={budget} cannot find k={k} eigenpairs; give >= k.")
    run = _Run(
        Counted(A, progress, budget, "eigs"), which, tol, budget, ncv, generator(seed), callback
    )
    try:
        vals, vecs, res, ok = run.round(None, k)
        while ok and 1 < k < d and run.op.n < budget:
            vals, vecs, res, ok, missed = run.verify(vals, vecs, res, k)
            if not missed:
                break
    finally:
        run.op.close()
    order = _priority(vals, which)[:k]
    if which == "both":
        order = order[torch.argsort(vals[order], descending=True)]
    return EigResult(vals[order], vecs[:, order], res[order], ok, run.op.n, which)


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


class _Run:
    """State shared by the Lanczos rounds of one ``eigs`` call."""

    def __init__(self, op: Counted, which, tol, budget, ncv, gen, callback):
        self.op, self.which, self.tol, self.budget = op, which, tol, budget
        self.ncv, self.gen, self.callback = ncv, gen, callback
        self.norm = 0.0

    def verify(self, vals, vecs, res, k):
        """Search the complement of ``vecs`` for an eigenvalue beyond the returned ones."""
        nev = 2 if self.which == "both" else 1
        v2, x2, r2, ok = self.round(vecs, min(nev, self.op.d - vecs.shape[1]))
        allv = torch.cat([vals, v2])
        keep = _priority(allv, self.which)[:k]
        dropped = [i for i in range(len(vals)) if i not in set(keep.tolist())]
        margin = self.tol * self.norm
        missed = any(
            abs(float(allv[i]) - float(vals[j])) > margin
            for i in keep.tolist()
            if i >= len(vals)
            for j in dropped
        )
        X = torch.cat([vecs, x2], 1)
        return allv[keep], X[:, keep], torch.cat([res, r2])[keep], ok, missed

    def round(self, locked: torch.Tensor | None, nev: int):
        """Thick-restart Lanczos on the complement of ``locked``: ``nev`` wanted Ritz pairs."""
        op, d = self.op, self.op.d
        p = 0 if locked is None else locked.shape[1]
        m = min(max(self.ncv or 2 * nev + 1, 20, nev + 1), d - p)
        Q = torch.zeros(d, m + 1, dtype=op.dtype, device=op.device)
        T = torch.zeros(m + 1, m + 1, dtype=torch.float64)
        Q[:, 0] = self._fresh(Q[:, :0], locked)
        j, stride = 0, max(1, m // 40)
        while True:
            beta = self._expand(Q, T, j, locked)
            j += 1
            exhausted = j == m or op.n >= self.budget
            if not exhausted and (j < nev or not (j % stride == 0 or beta == 0.0)):
                continue
            theta, S = torch.linalg.eigh(T[:j, :j])
            bounds = (beta * S[j - 1]).abs()
            order = _priority(theta, self.which)
            self.norm = max(self.norm, float(theta.abs().max()))
            if self.callback is not None:
                self.callback(op.n, theta[order[:nev]], bounds[order[:nev]])
            want = order[:nev]
            done = bool((bounds[want] <= self.tol * self.norm).all()) or j == d - p
            if done or op.n >= self.budget:
                X = Q[:, :j] @ S[:, want].to(Q)
                return theta[want], X, bounds[want], done
            if j == m:
                j = self._restart(Q, T, theta, S, beta, order, nev, m)

    def _expand(self, Q, T, j, locked) -> float:
        """Add ``A q_j`` to the basis; fills column ``j`` of ``T`` and returns ``beta_j``."""
        w = self.op(Q[:, j : j + 1])[:, 0]
        h = torch.zeros(j + 1, dtype=torch.float64)
        for _ in range(2):  # "twice is enough" (Parlett 1980; Giraud et al. 2005)
            c = Q[:, : j + 1].T @ w
            w = w - Q[:, : j + 1] @ c
            if locked is not None:
                w = w - locked @ (locked.T @ w)
            h += c.double().cpu()
        T[: j + 1, j] = h
        T[j, : j + 1] = h
        beta = float(torch.linalg.vector_norm(w.double()))
        if beta <= 1e3 * torch.finfo(Q.dtype).eps * max(self.norm, float(h.abs().max()), 1e-300):
            # invariant subspace: continue from a fresh direction, uncoupled (beta = 0)
            beta, w = 0.0, self._fresh(Q[:, : j + 1], locked)
        else:
            w = w / beta
        if j + 1 < Q.shape[1]:
            Q[:, j + 1] = w
            T[j + 1, j] = T[j, j + 1] = beta
        return beta

    def _fresh(self, Q: torch.Tensor, locked: torch.Tensor | None) -> torch.Tensor:
        """A random unit vector orthogonal to ``Q`` and ``locked``."""
        v = gaussian(self.gen, self.op.d, 1, self.op)[:, 0]
        for _ in range(2):
            for B in (Q, locked):
                if B is not None and B.shape[1]:
                    v = v - B @ (B.T @ v)
        return v / torch.linalg.vector_norm(v)

    def _restart(self, Q, T, theta, S, beta, order, nev, m) -> int:
        """Keep the ``p`` most wanted Ritz vectors and the residual direction."""
        p = min(m - 1, nev + max(1, (m - nev) // 2))
        keep = order[:p]
        Y = Q[:, :m] @ S[:, keep].to(Q)
        q_next = Q[:, m].clone()
        Q.zero_()
        Q[:, :p], Q[:, p] = Y, q_next
        b = beta * S[m - 1, keep]
        T.zero_()
        T[:p, :p] = torch.diag(theta[keep])
        T[p, :p] = T[:p, p] = b
        return p


def power_iteration(
    A: Any, k: int = 1, *, tol: float = 1e-3, max_matvecs: int | None = None, seed: int = 0
) -> EigResult:
    r"""Top-``k`` eigenpairs by power iteration with deflation, as PyHessian computes them.

    Each eigenpair iterates :math:`v \leftarrow Av/\|Av\|` (``v`` kept orthogonal to the pairs
    already found) until the Rayleigh quotient changes by less than ``tol`` relative; kept for
    parity with PyHessian (Yao et al. 2020). It converges slowly when eigenvalues are close and
    finds the largest in magnitude; prefer :func:`eigs`.

    Args:
        A: Symmetric operator or dense tensor ``(d, d)``.
        k: Number of eigenpairs.
        tol: Relative change of the Rayleigh quotient that stops an eigenpair.
        max_matvecs: Budget for all pairs; default ``100 k``.
        seed: Seed of the start vectors.

    Returns:
        EigResult with ``which="magnitude"``; residuals are ``||A v - theta v||``.
    """
    op, gen = Counted(A), generator(seed)
    budget = max_matvecs or 100 * k
    if budget < 2 * k:
        raise ValueError(f"power_iteration: max_matvecs={budget} is below 2 per eigenpair (k={k}).")
    X = torch.zeros(op.d, 0, dtype=op.dtype, device=op.device)
    vals, res, ok = [], [], True
    for i in range(k):
        w, theta, done = gaussian(gen, op.d, 1, op), None, False
        while op.n < budget * (i + 1) // k and not done:
            v = w - X @ (X.T @ w)
            v = v / torch.linalg.vector_norm(v)
            Av = op(v)
            new = float((v * Av).sum())
            r = float(torch.linalg.vector_norm(Av - new * v))
            done = theta is not None and abs(theta - new) / (abs(theta) + 1e-6) < tol
            theta, w = new, Av
        ok = ok and done
        X = torch.cat([X, v], 1)  # the vector whose Rayleigh quotient and residual are reported
        vals.append(theta)
        res.append(r)
    f64 = torch.float64
    return EigResult(
        torch.tensor(vals, dtype=f64), X, torch.tensor(res, dtype=f64), ok, op.n, "magnitude"
    )
