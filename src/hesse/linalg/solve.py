"""Linear solves with a (damped) curvature operator: CG, MINRES, LiSSA."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..operators.base import PSD, SYMMETRIC
from ._util import Counted, tags_of
from .eigs import eigs

METHODS = ("cg", "minres", "lissa")


@dataclass(frozen=True)
class SolveResult:
    """Solution of ``(A + damping I) x = b``.

    Attributes:
        value: ``x``, shaped like ``b`` (``(d,)`` or ``(d, k)``).
        converged: Whether every column reached ``||r|| <= tol ||b||``.
        n_matvecs: Matrix-vector products used.
        residual_norm: ``(k,)`` float64 bounds on the residual norms
            ``||b - (A + damping I) x||`` of the returned ``x``: recomputed with one product
            per column, plus ``product_error * ||x||`` for approximate products.
        product_error: The largest error per unit input of the products (an operator with a
            ``product_error``, finite differences: ``HessianOperator(mode="fd")``), 0 for exact
            products. The recomputed residual can be that far off, times ``||x||``.
    """

    value: torch.Tensor
    converged: bool
    n_matvecs: int
    residual_norm: torch.Tensor
    product_error: float = 0.0


def solve(
    A: Any,
    b: torch.Tensor,
    *,
    damping: float = 0.0,
    method: str = "cg",
    tol: float | None = None,
    max_matvecs: int | None = None,
    x0: torch.Tensor | None = None,
    scale: float | None = None,
) -> SolveResult:
    r"""Solve :math:`(A + \lambda I)\,x = b` from matrix-vector products.

    - ``"cg"``: conjugate gradients (Hestenes & Stiefel 1952), all columns of ``b`` in one
      product, each column dropped from the products once it converges (or meets non-positive
      curvature); needs :math:`A + \lambda I` positive definite.
    - ``"minres"``: MINRES (Paige & Saunders 1975), for symmetric indefinite systems such as an
      undamped Hessian away from a minimum.
    - ``"lissa"``: the LiSSA recursion :math:`x_{j} = b + (I - (A+\lambda I)/s)\,x_{j-1}`,
      returning :math:`x/s` (Agarwal, Bullins & Hazan 2017; Koh & Liang 2017 for influence
      functions), here with exact products; needs PSD and :math:`s > \lambda_{max}/2`.

    Every method stops when its recurrence reports
    :math:`\|b - (A+\lambda I)x\| \le \mathrm{tol}\,\|b\|` for every column, or when
    ``max_matvecs`` is spent; the residual of the returned ``x`` is then recomputed with one
    more product per column (counted within the budget), and only that decides ``converged``.
    Products that carry a measured error :math:`e` per unit input (finite differences) may
    be :math:`e\,\|x\|` off in that product, so the reported residual is
    :math:`\|b - (A+\lambda I)x\|_{\text{computed}} + e\,\|x\|`, a bound on the true one:
    a solve from approximate products is never more trusted than its products.

    Args:
        A: Operator or dense tensor ``(d, d)``.
        b: Right-hand side ``(d,)`` or ``(d, k)``.
        damping: :math:`\lambda \ge 0` added to the diagonal.
        method: ``"cg"``, ``"minres"`` or ``"lissa"``.
        tol: Relative residual tolerance; default 1e-8 in float64, 1e-5 in float32.
        max_matvecs: Products of ``A`` for all columns together, at least 2 per column (one
            is kept for the final residual); default ``min(10 d, 10,000)`` per column.
        x0: Start, of ``b``'s shape (default zero).
        scale: LiSSA's :math:`s` (default 1.1 times an estimate of :math:`\lambda_{max}+\lambda`).

    Returns:
        SolveResult.

    Raises:
        ValueError: ``cg``/``lissa`` on an operator not declared PSD without damping, a
            non-symmetric operator, negative damping, a budget below 2 per column, or an
            ``x0`` whose shape is not ``b``'s.
    """
    _check(A, method, damping, "solve")
    op = Counted(A)
    B = b[:, None] if b.dim() == 1 else b
    B = B.to(device=op.device, dtype=op.dtype)
    if x0 is not None and x0.shape != b.shape:
        raise ValueError(
            f"solve: x0 has shape {tuple(x0.shape)}, b has shape {tuple(b.shape)}; pass an x0 of "
            "b's shape, or None to start from zero."
        )
    X = torch.zeros_like(B) if x0 is None else x0.reshape(B.shape).to(B).clone()
    k = B.shape[1]
    if max_matvecs is None:
        max_matvecs = min(10 * op.dim, 10_000) * k
    _check_budget(max_matvecs, 2 * k, "solve", f" (2 per column of b, which has {k})")
    budget = max_matvecs - k  # k kept for the final residual
    tol = tol if tol is not None else default_tol(op.dtype)

    def apply(V: torch.Tensor) -> torch.Tensor:
        return op(V) + damping * V

    if method == "cg":
        X = _cg(apply, B, X, tol, budget, op)
    elif method == "minres":
        X = _columns(_minres, apply, B, X, tol, budget, op)
    else:
        s = scale or 1.1 * (_norm_estimate(op, min(20, max(1, budget // 2))) + damping)
        X = _lissa(apply, B, X, tol, budget, op, s)
    res = op.norm((B - apply(X)).double(), dim=0).cpu()
    res = res + op.error * op.norm(X.double(), dim=0).cpu()  # what the products may be off
    ok = bool((res <= tol * op.norm(B.double(), dim=0).cpu()).all())
    return SolveResult(X[:, 0] if b.dim() == 1 else X, ok, op.n, res, op.error)


def _cg(apply: Callable, B, X, tol, budget, op) -> torch.Tensor:
    """CG on every column at once, multiplying only the columns still running."""
    R = B - apply(X) if X.any() else B.clone()
    P = R.clone()
    rs = op.total((R.double() ** 2).sum(0))
    stop = tol**2 * op.total((B.double() ** 2).sum(0))
    live = rs > stop
    while live.any():
        idx = live.nonzero()[:, 0]
        if op.n + idx.numel() > budget:
            break
        Pa = P[:, idx]
        APa = apply(Pa)
        pap = op.total((Pa.double() * APa.double()).sum(0))
        ok = pap > 0  # non-positive curvature: not positive definite, this column stops here
        alpha = torch.where(ok, rs[idx] / pap.clamp_min(1e-300), 0.0)
        X[:, idx] += alpha.to(X) * Pa
        R[:, idx] -= alpha.to(R) * APa
        rs_new = op.total((R[:, idx].double() ** 2).sum(0))
        P[:, idx] = R[:, idx] + (rs_new / rs[idx].clamp_min(1e-300)).to(R) * Pa
        rs[idx] = rs_new
        live[idx] = ok & (rs_new > stop[idx])
    return X


def default_tol(dtype: torch.dtype) -> float:
    """``solve``'s default relative tolerance: 1e-8 in float64, 1e-5 otherwise."""
    return 1e-8 if dtype == torch.float64 else 1e-5


def _check_budget(max_matvecs: Any, least: int, who: str, why: str = "") -> None:
    """Refuse a ``max_matvecs`` that is not an integer of at least ``least``."""
    if isinstance(max_matvecs, bool) or not isinstance(max_matvecs, numbers.Integral):
        raise TypeError(f"{who}: max_matvecs must be an integer, got {max_matvecs!r}.")
    if max_matvecs < least:
        raise ValueError(f"{who}: max_matvecs must be at least {least}{why}, got {max_matvecs}.")


def _check(A: Any, method: str, damping: float, who: str) -> None:
    """Refuse a method the operator's declared structure does not allow (see ``solve``)."""
    if method not in METHODS:
        raise ValueError(f"{who}: method must be one of {METHODS}, got {method!r}.")
    if damping < 0:
        raise ValueError(f"{who}: damping must be >= 0, got {damping}.")
    tags = tags_of(A)
    if SYMMETRIC not in tags:
        raise ValueError(f"{who}(method={method!r}): the operator is not declared symmetric.")
    if method != "minres" and PSD not in tags and damping <= 0:
        raise ValueError(
            f"{who}(method={method!r}) needs a positive-definite operator, but this one is not "
            "declared PSD (a Hessian is indefinite away from a minimum). Pass damping=lam > 0 "
            "larger than minus its most negative eigenvalue, use method='minres', or solve with "
            "a GGNOperator / FisherOperator."
        )


def _columns(fn: Callable, apply, B, X, tol, budget, op) -> torch.Tensor:
    """Run a single-vector solver column by column."""
    cols = []
    for i in range(B.shape[1]):
        share = op.n + (budget - op.n) // (B.shape[1] - i)
        cols.append(fn(apply, B[:, i], X[:, i], tol, share, op))
    return torch.stack(cols, 1)


def _minres(apply: Callable, b, x, tol, budget, op) -> torch.Tensor:
    """MINRES for symmetric ``apply`` (Paige & Saunders 1975), scalars in float64."""

    def mv(v: torch.Tensor) -> torch.Tensor:
        return apply(v[:, None])[:, 0]

    r1 = b - mv(x) if x.any() else b.clone()
    beta = float(op.norm(r1.double()))
    bnorm = float(op.norm(b.double()))
    if beta <= tol * bnorm:
        return x
    y, r2 = r1.clone(), r1.clone()
    oldb, dbar, epsln, phibar, cs, sn = 0.0, 0.0, 0.0, beta, -1.0, 0.0
    w = torch.zeros_like(b)
    w2 = torch.zeros_like(b)
    while op.n < budget:
        v = y / beta
        y = mv(v)
        if oldb > 0:
            y = y - (beta / oldb) * r1
        alfa = float(op.total((v.double() * y.double()).sum()))
        y = y - (alfa / beta) * r2
        r1, r2 = r2, y
        oldb, beta = beta, float(op.norm(y.double()))
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln, dbar = sn * beta, -cs * beta
        gamma = max((gbar**2 + beta**2) ** 0.5, 1e-300)
        cs, sn = gbar / gamma, beta / gamma
        phi, phibar = cs * phibar, sn * phibar
        w1, w2 = w2, w
        w = (v - oldeps * w1 - delta * w2) / gamma
        x = x + phi * w
        if phibar <= tol * bnorm or beta == 0.0:
            break
    return x


def _lissa(apply: Callable, B, X, tol, budget, op, s) -> torch.Tensor:
    Y = X * s
    stop = tol * op.norm(B.double(), dim=0).cpu()
    while op.n + B.shape[1] <= budget:
        R = B - apply(Y) / s  # residual of (A + lam I)(Y / s) = B
        if (op.norm(R.double(), dim=0).cpu() <= stop).all():
            break
        Y = Y + R
    return Y / s


def _norm_estimate(op: Counted, steps: int) -> float:
    """Largest eigenvalue of a PSD operator from a short Lanczos run."""
    r = eigs(op.A, k=1, tol=1e-3, max_matvecs=steps)
    op.n += r.n_matvecs
    return float(r.values[0]) + float(r.residuals[0])


class NotConvergedError(RuntimeError):
    """A solve behind an ``InverseOperator`` product did not converge; ``result`` holds it."""

    def __init__(self, message: str, result: SolveResult):
        super().__init__(message)
        self.result = result
