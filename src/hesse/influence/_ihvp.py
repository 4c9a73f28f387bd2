r"""Inverse-curvature products :math:`(A + \lambda I)^{-1} B` for influence and its kin.

One entry point, :func:`inverse_products`, with six methods that all return the same
diagnostics: ``"exact"`` (dense Cholesky, small ``d``), ``"cg"`` (``hesse.solve``), ``"lissa"``
(``hesse.solve`` with the scale and depth chosen from a Lanczos estimate of
:math:`\lambda_{max}`), ``"woodbury"`` (the exact inverse of a ``WoodburyFisher``), and
``"kfac"`` / ``"ekfac"`` (the exact damped inverse of a ``KFACOperator`` / ``EKFACOperator``,
block by block from its factors: kronfluence's EK-FAC influence, Grosse et al. 2023,
"Studying large language model generalization with influence functions"). The numerics live
in ``hesse.linalg`` and ``hesse.operators``; this module only chooses their settings and turns
an indefinite system into an error that names the fix.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch

from ..linalg import eigs, solve
from ..operators import (
    PSD,
    SYMMETRIC,
    EKFACOperator,
    KFACOperator,
    Operator,
    WoodburyFisher,
)

METHODS = ("exact", "cg", "lissa", "woodbury", "kfac", "ekfac")
KRONECKER: dict[str, type[KFACOperator] | type[EKFACOperator]] = {
    "kfac": KFACOperator,
    "ekfac": EKFACOperator,
}
"""The Kronecker-factored methods and their operators."""
"""The ``kind`` of the Kronecker factors that approximate each curvature."""


@dataclass(frozen=True)
class InverseDiagnostics:
    r"""How the inverse-curvature products were computed, and how far to trust them.

    Attributes:
        method: One of ``METHODS``.
        damping: :math:`\lambda` added to the curvature's diagonal.
        converged: Every column met ``||b - (A + λI) x|| <= tol ||b||``.
        n_matvecs: Curvature-vector products spent (Lanczos estimates included).
        residuals: ``(k,)`` float64 relative residuals ``||b - (A + λI) x|| / ||b||``.
        tol: The relative tolerance asked for.
        lam_max: Largest eigenvalue of ``A`` (measured for ``"lissa"`` and ``"exact"``).
        lam_min: Smallest eigenvalue of ``A`` (measured when definiteness had to be checked).
        scale: LiSSA's :math:`s` (None for other methods).
        depth: LiSSA's iteration budget per column (None for other methods).
        seconds: Wall-clock time of the solve.
        approximates: For ``"kfac"`` and ``"ekfac"``, the curvature whose Kronecker-factored
            approximation was inverted (``"ggn"`` or ``"fisher"``): the products and their
            residuals are exact for the damped approximation, not for that curvature itself.
    """

    method: str
    damping: float
    converged: bool
    n_matvecs: int
    residuals: torch.Tensor
    tol: float
    lam_max: float | None = None
    lam_min: float | None = None
    scale: float | None = None
    depth: int | None = None
    seconds: float = 0.0
    approximates: str | None = None

    def to_dict(self) -> dict:
        """Plain numbers, for a JSON report."""
        out = {k: v for k, v in self.__dict__.items() if k != "residuals"}
        return out | {"max_residual": float(self.residuals.max()) if len(self.residuals) else 0.0}


class _MeasuredPSD(Operator):
    """An operator declared PSD because Lanczos measured its smallest eigenvalue above zero."""

    def __init__(self, op: Operator):
        super().__init__(op.shape[0], op.dtype, op.device, (SYMMETRIC, PSD), op.space)
        self.op = op

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.op.matmat(V)


def inverse_products(
    op: Operator,
    B: torch.Tensor,
    *,
    method: str,
    damping: float,
    tol: float | None = None,
    max_matvecs: int | None = None,
    seed: int = 0,
    who: str = "influence",
) -> tuple[torch.Tensor, InverseDiagnostics]:
    r"""Solve :math:`(A + \lambda I) X = B` column by column, with diagnostics.

    Args:
        op: The symmetric curvature ``A`` (d, d); a ``WoodburyFisher`` for ``"woodbury"``
            (whose own damping is :math:`\lambda`, so ``damping`` must be 0 there), a
            ``KFACOperator`` for ``"kfac"``, an ``EKFACOperator`` for ``"ekfac"``.
        B: ``(d, k)`` right-hand sides.
        method: One of ``METHODS``.
        damping: :math:`\lambda \ge 0`.
        tol: Relative residual tolerance of ``"cg"`` and ``"lissa"`` (default
            :func:`default_tol`).
        max_matvecs: Products allowed per column (default: ``solve``'s for CG; LiSSA's depth
            from the condition-number bound, at most 100,000).
        seed: Seed of the Lanczos start vectors.
        who: The caller's name, for error messages.

    Returns:
        ``(X, diagnostics)`` with ``X`` of ``B``'s shape and dtype float64 when ``A`` is.

    Raises:
        ValueError: an unknown method, negative damping, or a curvature that is not positive
            definite once damped (the message gives the measured eigenvalue and the fix; for
            ``"kfac"``/``"ekfac"`` the singular block).
    """
    if method not in METHODS:
        raise ValueError(f"{who}: ihvp must be one of {METHODS}, got {method!r}.")
    if not damping >= 0:
        raise ValueError(
            f"{who}: damping must be >= 0 (it is added to the curvature's diagonal), got "
            f"{damping}. For a model trained with weight decay wd on the mean loss pass "
            "damping=wd; use a small positive value to stabilise a near-singular curvature."
        )
    start = time.perf_counter()
    tol = default_tol(op.dtype) if tol is None else tol
    solvers = {"exact": _exact, "cg": _cg, "lissa": _lissa, "woodbury": _woodbury}
    solver = solvers.get(method, functools.partial(_kronecker, method))
    X, diag = solver(op, B, damping, tol, max_matvecs, seed, who)
    return X, _replace(diag, seconds=time.perf_counter() - start)


def default_tol(dtype: torch.dtype) -> float:
    """1e-6 in float64, 1e-5 otherwise.

    What the products' round-off allows, and enough for scores (LiSSA's depth grows with
    ``log(1/tol)``).
    """
    return 1e-6 if dtype == torch.float64 else 1e-5


def _replace(diag: InverseDiagnostics, **changes) -> InverseDiagnostics:
    return InverseDiagnostics(**(diag.__dict__ | changes))


def _relative(op: Operator, X: torch.Tensor, B: torch.Tensor, damping: float) -> torch.Tensor:
    R = (B - op @ X - damping * X).double()
    return (R.norm(dim=0) / B.double().norm(dim=0).clamp_min(1e-300)).cpu()


def _indefinite(who: str, lam_min: float, damping: float, method: str) -> ValueError:
    need = max(0.0, -lam_min)
    return ValueError(
        f"{who}(ihvp={method!r}): the curvature is not positive definite once damped: its "
        f"smallest eigenvalue is {lam_min:.3g} and damping={damping:g}, so the system is "
        "singular or indefinite (the parameters are not at a strict minimum). Pass damping > "
        f"{need:.3g} (e.g. {1.1 * need + 1e-3:.3g}), or curvature='ggn' (positive "
        "semi-definite for cross-entropy and MSE, with damping > 0)."
    )


def _smallest(op: Operator, seed: int, budget: int) -> tuple[float, bool, int]:
    """Smallest eigenvalue of ``op`` by Lanczos: ``(value, converged, products)``."""
    r = eigs(op, k=1, which="smallest", tol=1e-6, max_matvecs=budget, seed=seed)
    return float(r.values[0]), r.converged, r.n_matvecs


def _definite(op: Operator, damping: float, seed: int, who: str, method: str):
    r"""``op`` ready for CG/LiSSA: declared PSD, damped, or measured positive definite.

    LiSSA without damping always measures :math:`\lambda_{min}`, PSD or not: its depth is
    set by it, and a singular PSD matrix (an undamped GGN) would never converge.

    Returns:
        ``(operator, lam_min or None, products spent)``.
    """
    if damping > 0 or (PSD in op.tags and method != "lissa"):
        return op, None, 0
    lam_min, ok, used = _smallest(op, seed, min(op.shape[0] + 2, 500))
    if not ok or lam_min <= 0:
        raise _indefinite(who, lam_min, damping, method)
    return (op if PSD in op.tags else _MeasuredPSD(op)), lam_min, used


def _diagnose(op, converged, lam_min, used, damping, seed, who, method):
    """After a failed solve of an operator not declared PSD: raise if it is indefinite.

    CG stops on non-positive curvature and LiSSA diverges on it; the smallest eigenvalue
    tells that apart from a budget that was too small.
    """
    if converged or PSD in op.tags or lam_min is not None:
        return lam_min, used
    lam_min, _, more = _smallest(op, seed, min(op.shape[0] + 2, 500))
    if lam_min + damping <= 0:
        raise _indefinite(who, lam_min, damping, method)
    return lam_min, used + more


def _exact(op, B, damping, tol, max_matvecs, seed, who):
    M = op.to_dense().double()
    M = (M + M.T) / 2
    values = torch.linalg.eigvalsh(M)
    lam_min, lam_max = float(values[0]), float(values[-1])
    if lam_min + damping <= 1e-12 * max(abs(lam_max), 1.0):
        raise _indefinite(who, lam_min, damping, "exact")
    M.diagonal().add_(damping)
    X = torch.cholesky_solve(B.double(), torch.linalg.cholesky(M)).to(B.dtype)
    R = (B.double() - M @ X.double()).norm(dim=0) / B.double().norm(dim=0).clamp_min(1e-300)
    d = op.shape[0]
    return X, InverseDiagnostics(
        "exact", damping, True, d, R.cpu(), tol, lam_max=lam_max, lam_min=lam_min
    )


def _cg(op, B, damping, tol, max_matvecs, seed, who):
    A, lam_min, used = _definite(op, damping, seed, who, "cg")
    budget = None if max_matvecs is None else max_matvecs * B.shape[1]
    r = solve(A, B, damping=damping, method="cg", tol=tol, max_matvecs=budget)
    rel = r.residual_norm / B.double().norm(dim=0).cpu().clamp_min(1e-300)
    lam_min, used = _diagnose(op, r.converged, lam_min, used, damping, seed, who, "cg")
    diag = InverseDiagnostics(
        "cg", damping, r.converged, r.n_matvecs + used, rel, tol, lam_min=lam_min
    )
    return r.value, diag


def _lissa(op, B, damping, tol, max_matvecs, seed, who):
    r"""LiSSA with :math:`s = 1.05(\lambda_{max} + r + \lambda)` and depth from the bound.

    The recursion contracts the error by :math:`1 - (\lambda_{min} + \lambda)/s` per step,
    so :math:`\lceil \ln(\mathrm{tol}) / \ln(1 - \mu/s) \rceil` steps reach ``tol`` with
    :math:`\mu` the smallest eigenvalue (measured when undamped) plus the damping.
    """
    A, lam_min, used = _definite(op, damping, seed, who, "lissa")
    if lam_min is None and PSD not in op.tags:
        # damping alone overstates the contraction of an indefinite operator: measure it
        lam_min, _, more = _smallest(op, seed, min(op.shape[0] + 2, 500))
        used += more
        if lam_min + damping <= 0:
            raise _indefinite(who, lam_min, damping, "lissa")
    top = eigs(A, k=1, which="largest", tol=1e-4, max_matvecs=200, seed=seed)
    used += top.n_matvecs
    lam_max = float(top.values[0])
    s = 1.05 * (lam_max + float(top.residuals[0]) + damping)
    mu = (lam_min or 0.0) + damping
    depth = 100_000 if mu <= 0 else math.ceil(math.log(tol) / math.log1p(-min(mu / s, 0.5)))
    depth = max(1, min(depth, 100_000) if max_matvecs is None else min(depth, max_matvecs))
    k = B.shape[1]
    r = solve(A, B, damping=damping, method="lissa", tol=tol, max_matvecs=(depth + 1) * k, scale=s)
    rel = r.residual_norm / B.double().norm(dim=0).cpu().clamp_min(1e-300)
    lam_min, used = _diagnose(op, r.converged, lam_min, used, damping, seed, who, "lissa")
    diag = InverseDiagnostics(
        "lissa", damping, r.converged, r.n_matvecs + used, rel, tol, lam_max, lam_min, s, depth
    )
    return r.value, diag


def _woodbury(op, B, damping, tol, max_matvecs, seed, who):
    if not isinstance(op, WoodburyFisher):
        raise TypeError(f"{who}(ihvp='woodbury'): expected a WoodburyFisher, got {op!r}.")
    X = op.inverse(damping) @ B
    rel = _relative(op, X, B, damping)
    ok = bool((rel <= max(tol, 1e-6)).all())
    return X, InverseDiagnostics("woodbury", op.damping + damping, ok, B.shape[1], rel, tol)


def _kronecker(method, op, B, damping, tol, max_matvecs, seed, who):
    """The exact damped inverse of a Kronecker-factored operator, checked by its residual."""
    if not isinstance(op, KRONECKER[method]):
        expected = KRONECKER[method].__name__
        raise TypeError(f"{who}(ihvp={method!r}): expected a {expected}, got {op!r}.")
    try:
        X = op.inverse(damping) @ B
    except ValueError as err:  # a singular block at this damping: the message names it
        raise ValueError(f"{who}(ihvp={method!r}): {err}") from err
    rel = _relative(op, X, B, damping)
    ok = bool((rel <= max(tol, 1e-6)).all())
    approximates = "fisher" if op.kind == "empirical" else "ggn"
    return X, InverseDiagnostics(
        method, damping, ok, B.shape[1], rel, tol, approximates=approximates
    )
