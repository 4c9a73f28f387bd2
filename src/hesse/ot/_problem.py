"""Checked inputs, the plan from dual potentials, and the result type of entropic OT."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class OTResult:
    r"""Entropic optimal-transport solution and how it was reached.

    Attributes:
        plan: ``(n, m)`` transport plan :math:`P_{ij} = \exp((f_i + g_j - C_{ij})/\varepsilon)`.
        f: ``(n,)`` dual potential of the source marginal ``a``.
        g: ``(m,)`` dual potential of the target marginal ``b``.
        cost: Transport cost :math:`\langle C, P\rangle`.
        objective: Primal objective :math:`\langle C,P\rangle + \varepsilon\sum P(\log P-1)`.
        dual: Dual :math:`\langle a,f\rangle + \langle b,g\rangle - \varepsilon\sum P`,
            equal to ``objective`` at the optimum (strong duality) up to the marginal error.
        marginal_error: :math:`\sqrt{\|P\mathbf 1-a\|^2 + \|P^\top\mathbf 1-b\|^2}` of the
            returned plan (the Euclidean norm of the dual gradient; POT's Sinkhorn stopping
            quantity, whose row term is zero right after its ``u`` update).
        sinkhorn_iterations: Full Sinkhorn sweeps (one ``f`` and one ``g`` update each).
        newton_iterations: Sparse-Newton steps taken.
        cg_iterations: Conjugate-gradient iterations over all Newton steps.
        hessian_nnz: Mean number of kept plan entries in the sparsified Hessian (0 without Newton).
        converged: Whether ``marginal_error <= tol``.
        errors: Marginal error after each check (every ``check_every`` Sinkhorn sweeps, then
            after every Newton step).
    """

    plan: np.ndarray
    f: np.ndarray
    g: np.ndarray
    cost: float
    objective: float
    dual: float
    marginal_error: float
    sinkhorn_iterations: int
    newton_iterations: int
    cg_iterations: int
    hessian_nnz: float
    converged: bool
    errors: tuple[float, ...]


def check_problem(a: Any, b: Any, C: Any, reg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``a``, ``b``, ``C`` as float64 arrays after checking shapes, masses and ``reg``."""
    a, b, C = (np.asarray(x, dtype=np.float64) for x in (a, b, C))
    if a.ndim != 1 or b.ndim != 1 or C.shape != (a.size, b.size):
        raise ValueError(
            f"entropic OT: expected a (n,), b (m,) and C (n, m); got a {a.shape}, b {b.shape}, "
            f"C {C.shape}. Pass the histograms as flat vectors and the cost as an n-by-m matrix."
        )
    if not (np.all(a > 0) and np.all(b > 0)):
        raise ValueError(
            "entropic OT: every entry of a and b must be > 0 (a zero mass has potential -inf); "
            "drop the zero-mass points from a, b and the rows/columns of C."
        )
    if abs(a.sum() - b.sum()) > 1e-12 * max(a.sum(), b.sum()):
        raise ValueError(
            f"entropic OT: a and b must have the same total mass; got {a.sum()!r} and "
            f"{b.sum()!r}. Normalize both, e.g. a / a.sum() and b / b.sum()."
        )
    if not np.all(np.isfinite(C)):
        raise ValueError("entropic OT: C has non-finite entries; use a finite cost matrix.")
    if not (np.isfinite(reg) and reg > 0):
        raise ValueError(f"entropic OT: reg must be a finite number > 0; got {reg!r}.")
    return a, b, C


def log_plan(f: np.ndarray, g: np.ndarray, C: np.ndarray, reg: float) -> np.ndarray:
    r"""``(n, m)`` matrix :math:`(f_i + g_j - C_{ij})/\varepsilon`, the logarithm of the plan."""
    return (f[:, None] + g[None, :] - C) / reg


def marginal_error(P: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean norm of the stacked marginal violations of ``P``."""
    return float(np.hypot(np.linalg.norm(P.sum(1) - a), np.linalg.norm(P.sum(0) - b)))


def make_result(
    f: np.ndarray,
    g: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    C: np.ndarray,
    reg: float,
    *,
    tol: float,
    counts: dict[str, float],
    errors: list[float],
) -> OTResult:
    """Build the :class:`OTResult` of potentials ``f, g``; ``counts`` holds the iteration counts."""
    L = log_plan(f, g, C, reg)
    P = np.exp(L)
    err = marginal_error(P, a, b)
    mass = float(P.sum())
    return OTResult(
        plan=P,
        f=f,
        g=g,
        cost=float(np.vdot(C, P)),
        objective=float(np.vdot(C, P) + reg * (np.vdot(P, L) - mass)),
        dual=float(a @ f + b @ g - reg * mass),
        marginal_error=err,
        sinkhorn_iterations=int(counts.get("sinkhorn", 0)),
        newton_iterations=int(counts.get("newton", 0)),
        cg_iterations=int(counts.get("cg", 0)),
        hessian_nnz=float(counts.get("nnz", 0.0)),
        converged=bool(err <= tol),
        errors=tuple(errors),
    )
