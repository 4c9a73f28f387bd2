"""Stabilized Sinkhorn matrix scaling for entropic optimal transport (float64)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import logsumexp

from ._problem import OTResult, check_problem, log_plan, make_result

_ABSORB = 1e30  # absorb the scalings into the potentials before they can overflow


def sinkhorn(
    a: Any,
    b: Any,
    C: Any,
    reg: float,
    *,
    tol: float = 1e-9,
    max_iter: int = 100_000,
    check_every: int = 10,
) -> OTResult:
    r"""Entropic OT by Sinkhorn's matrix scaling, stabilized by absorbing scalings into potentials.

    Solves

    .. math::
        \min_{P \ge 0,\ P\mathbf 1 = a,\ P^\top \mathbf 1 = b}
        \langle C, P\rangle + \varepsilon \sum_{ij} P_{ij}(\log P_{ij} - 1)

    through the potentials :math:`P = \exp((f_i + g_j - C_{ij})/\varepsilon)`. Each sweep
    scales rows then columns, :math:`u = a / (\tilde K v)`, :math:`v = b / (\tilde K^\top u)`,
    with the kernel :math:`\tilde K` of the current potentials; ``u`` and ``v`` are absorbed into
    ``f`` and ``g`` (and :math:`\tilde K` recomputed) once they leave :math:`[10^{-30}, 10^{30}]`
    and at every check, so small ``reg`` neither overflows nor underflows (Schmitzer 2019,
    "Stabilized sparse scaling algorithms for entropy regularized transport problems").
    Potentials start at the row minima of ``C`` followed by one exact log-domain column update.

    Args:
        a: Source histogram ``(n,)``, entries > 0.
        b: Target histogram ``(m,)``, entries > 0, same total mass as ``a``.
        C: Cost matrix ``(n, m)``.
        reg: Entropic regularization :math:`\varepsilon > 0`.
        tol: Stop once the marginal error (see :class:`OTResult`) is at most ``tol``.
        max_iter: Most sweeps.
        check_every: Sweeps between checks of the marginal error (POT checks every 10).

    Returns:
        OTResult with ``newton_iterations == 0``.

    Raises:
        ValueError: Inconsistent shapes, non-positive or unequal masses, non-finite ``C``, or
            ``reg <= 0``.

    Example:
        >>> import numpy as np
        >>> from hesse.ot import sinkhorn
        >>> x = np.linspace(0, 1, 5)
        >>> r = sinkhorn(np.full(5, 0.2), np.full(5, 0.2), (x[:, None] - x) ** 2, 0.1)
        >>> bool(r.converged), bool(np.allclose(r.plan.sum(0), 0.2, atol=1e-9))
        (True, True)
    """
    a, b, C = check_problem(a, b, C, reg)
    f, g = initial_potentials(a, b, C, reg)
    f, g, n_iter, errors = sinkhorn_phase(a, b, C, reg, f, g, tol, max_iter, check_every)
    counts: dict[str, float] = {"sinkhorn": n_iter}
    return make_result(f, g, a, b, C, reg, tol=tol, counts=counts, errors=errors)


def initial_potentials(
    a: np.ndarray, b: np.ndarray, C: np.ndarray, reg: float
) -> tuple[np.ndarray, np.ndarray]:
    """Row minima of ``C`` for ``f``, then the exact log-domain update of ``g``."""
    f = C.min(axis=1)
    return f, log_update(b, log_plan(f, np.zeros(b.size), C, reg).T, reg)


def log_update(b: np.ndarray, L: np.ndarray, reg: float) -> np.ndarray:
    """Potential that makes the row sums of ``exp(L + g/reg)`` equal ``b``; ``L`` is ``(m, n)``."""
    return reg * (np.log(b) - logsumexp(L, axis=1))


def sinkhorn_phase(
    a: np.ndarray,
    b: np.ndarray,
    C: np.ndarray,
    reg: float,
    f: np.ndarray,
    g: np.ndarray,
    tol: float,
    max_iter: int,
    check_every: int,
) -> tuple[np.ndarray, np.ndarray, int, list[float]]:
    """Run up to ``max_iter`` stabilized sweeps from ``f, g``; return potentials, sweeps, errors."""
    n_iter, errors = 0, []
    while n_iter < max_iter:
        K = np.exp(log_plan(f, g, C, reg))
        u, v, sweeps, err, underflow = _scale_block(K, a, b, min(check_every, max_iter - n_iter))
        f, g, n_iter = f + reg * np.log(u), g + reg * np.log(v), n_iter + sweeps
        if underflow:  # a kernel row or column underflowed to zero: one exact log-domain sweep
            f = log_update(a, log_plan(np.zeros_like(a), g, C, reg), reg)
            g = log_update(b, log_plan(f, np.zeros_like(b), C, reg).T, reg)
            n_iter += 1
        if err is not None:
            errors.append(err)
            if err <= tol:
                break
    return f, g, n_iter, errors


def _scale_block(
    K: np.ndarray, a: np.ndarray, b: np.ndarray, steps: int
) -> tuple[np.ndarray, np.ndarray, int, float | None, bool]:
    """Up to ``steps`` scaling sweeps on ``K``: ``u, v``, sweeps done, error or None, underflow.

    Stops early (error None) when a scaling leaves the safe range; the caller then absorbs.
    """
    u, v = np.ones_like(a), np.ones_like(b)
    for sweep in range(steps):
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            u_new = a / (K @ v)
            v_new = b / (K.T @ u_new)
        if not _in_range(u_new, v_new):
            return u, v, sweep, None, True
        u, v = u_new, v_new
        if max(u.max(), v.max(), 1 / u.min(), 1 / v.min()) > _ABSORB:
            return u, v, sweep + 1, None, False
    return u, v, steps, float(np.linalg.norm(u * (K @ v) - a)), False


def _in_range(u: np.ndarray, v: np.ndarray) -> bool:
    """Whether every scaling is finite and > 0 (no kernel row or column underflowed)."""
    return bool(np.all(np.isfinite(u)) and np.all(np.isfinite(v)) and u.min() > 0 and v.min() > 0)
