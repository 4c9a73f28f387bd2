"""Gradient-regularized Newton with approximate Hessians (Semenov, Jaggi & Doikov 2025)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..linalg import SolveResult, solve
from ..operators import curvature_operator, kronecker_operator
from . import _closure
from .newton import _GraphHessian

CURVATURES = ("hessian", "ggn", "fisher", "kfac", "ekfac")
_MAX_SEARCH = 40
_EPS = 2.0**-52


def gns_step(
    H: Any, g: torch.Tensor, gamma: float, *, tol: float | None = None, max_matvecs: int = 50
) -> tuple[torch.Tensor, float, SolveResult]:
    r"""The gradient-regularized Newton step for the gradient-normalized smoothness ``gamma``.

    .. math::
        \lambda = \frac{\|g\|}{\gamma},\qquad \Delta = -(H + \lambda I)^{-1} g

    solved by CG (:func:`hesse.solve`). For a Hessian that is :math:`L`-Lipschitz,
    :math:`\gamma \approx \sqrt{\|g\|/L}` gives Mishchenko's :math:`\lambda = \sqrt{L\|g\|}`.

    Args:
        H: Curvature ``(d, d)`` (operator or tensor; exact or approximate Hessian).
        g: Gradient ``(d,)``.
        gamma: :math:`\gamma > 0`, the radius in which ``H`` linearizes the gradient well.
        tol: CG's relative residual tolerance.
        max_matvecs: Products of ``H`` for the solve.

    Returns:
        ``(delta, lam, solve_result)``.
    """
    lam = float(g.norm()) / gamma
    result = solve(H, -g, damping=lam, method="cg", tol=tol, max_matvecs=max_matvecs)
    return result.value, lam, result


def gns_accept(
    f: float, f_new: float, g_new_norm: float, lam: float, *, g_norm: float = 0.0
) -> bool:
    r"""The adaptive rule of Algorithm 1: accept iff :math:`f - f_+ \ge \|g_+\|^2/(8\lambda)`.

    On acceptance :math:`\gamma` doubles, otherwise it halves and the step is recomputed.
    Departure from the paper: near the optimum :math:`f - f_+` drowns in float64 round-off
    (below :math:`4\epsilon|f|`) and the test turns into noise that halves :math:`\gamma`
    for nothing; there a step is also accepted when it lowers the gradient norm below
    ``g_norm`` (the current one; 0 disables this).

    Args:
        f: Loss at the current point.
        f_new: Loss at the trial point.
        g_new_norm: :math:`\|g_+\|`, the gradient norm at the trial point.
        lam: The damping :math:`\lambda = \|g\|/\gamma` of the step.
        g_norm: The current gradient norm (for the round-off rule; 0 disables it).

    Returns:
        Whether to accept the trial point.
    """
    if f - f_new >= g_new_norm**2 / (8 * lam):
        return True
    return abs(f - f_new) <= 4 * _EPS * abs(f) and g_new_norm < g_norm


@dataclass(frozen=True)
class GNSResult:
    """Outcome of :func:`gns_newton`.

    Attributes:
        params: Final flat parameters ``(d,)`` (also written into the objective).
        loss: Final loss.
        grad_norm: Final gradient norm.
        iterations: Accepted steps.
        n_matvecs: Curvature products over all CG solves.
        n_evaluations: Loss-and-gradient evaluations (one per trial step, plus the first).
        converged: Whether ``grad_norm <= tol``.
        history: ``(loss, grad_norm, gamma)`` at every iterate, the start included.
    """

    params: torch.Tensor
    loss: float
    grad_norm: float
    iterations: int
    n_matvecs: int
    n_evaluations: int
    converged: bool
    history: tuple[tuple[float, float, float], ...]


def gns_newton(
    objective: Any,
    *,
    curvature: str | Callable[[Any], Any] = "hessian",
    gamma: float = 1.0,
    tol: float = 1e-10,
    max_iter: int = 100,
    max_matvecs: int = 100,
    cg_tol: float | None = None,
    callback: Callable[[int, float, float], None] | None = None,
) -> GNSResult:
    r"""Minimize an :class:`hesse.Objective` by gradient-regularized Newton steps (full batch).

    Algorithm 1 of Semenov, Jaggi & Doikov (2025), "Gradient-Normalized Smoothness for
    Optimization with Approximate Hessians": at :math:`x_k`, with curvature :math:`H_k` (exact
    or approximate),

    .. math::
        x_{k+1} = x_k - (H_k + \tfrac{\|g_k\|}{\gamma_k} I)^{-1} g_k,\qquad
        \text{accepted iff } f(x_k) - f(x_{k+1}) \ge \frac{\gamma_k\|g_{k+1}\|^2}{8\|g_k\|},

    doubling :math:`\gamma_k` after an accepted step and halving it (and re-solving) after a
    rejected one. The paper proves a global linear rate on logistic and softmax regression
    with approximate Hessians (Gauss-Newton, Fisher) whenever they bound the Hessian within a
    constant factor. Solves run CG on the damped operator (:func:`hesse.solve`).

    Args:
        objective: The :class:`hesse.Objective`; its parameters are updated in place (and so
            the model's, when the objective's tensors are views of them).
        curvature: ``"hessian"``, ``"ggn"``, ``"fisher"`` (empirical), ``"kfac"`` or
            ``"ekfac"`` (Kronecker factors of the GGN), rebuilt at every iterate; or a callable
            ``curvature(objective) -> operator`` (e.g. a Monte-Carlo Fisher, or a fixed bound
            such as Böhning's for softmax regression), called at every iterate.
        gamma: Initial :math:`\gamma_0 > 0`.
        tol: Stop once :math:`\|g\| \le` ``tol``.
        max_iter: Most accepted steps.
        max_matvecs: Curvature products per solve.
        cg_tol: CG's relative residual tolerance (default: :func:`hesse.solve`'s).
        callback: ``callback(k, loss, grad_norm)`` after each accepted step.

    Returns:
        GNSResult.

    Raises:
        ValueError: an unknown ``curvature`` or ``gamma <= 0``.
    """
    if not callable(curvature) and curvature not in CURVATURES:
        raise ValueError(
            f"gns_newton: curvature must be one of {CURVATURES} or a callable "
            f"curvature(objective) -> operator, got {curvature!r}."
        )
    if not gamma > 0:
        raise ValueError(f"gns_newton: gamma must be > 0, got {gamma!r}.")
    obj, space = objective, objective.space
    x = space.join(obj.params).detach().clone()
    f, g = float(obj.value()), obj.gradient()
    history, n_mv, n_eval, k = [(f, float(g.norm()), gamma)], 0, 1, 0
    while float(g.norm()) > tol and k < max_iter:
        H = _curvature(obj, curvature)
        for _ in range(_MAX_SEARCH):
            delta, lam, res = gns_step(H, g, gamma, tol=cg_tol, max_matvecs=max_matvecs)
            n_mv, n_eval = n_mv + res.n_matvecs, n_eval + 1
            _assign(obj, x + delta)
            f_new, g_new = float(obj.value()), obj.gradient()
            if gns_accept(f, f_new, float(g_new.norm()), lam, g_norm=float(g.norm())):
                break
            gamma /= 2
        else:  # no gamma passed the test: stay at x and report it
            _assign(obj, x)
            break
        x, f, g, gamma, k = x + delta, f_new, g_new, 2 * gamma, k + 1
        history.append((f, float(g.norm()), gamma))
        if callback is not None:
            callback(k, f, float(g.norm()))
    gn = float(g.norm())
    return GNSResult(x, f, gn, k, n_mv, n_eval, gn <= tol, tuple(history))


def _curvature(obj: Any, curvature: str | Callable[[Any], Any]) -> Any:
    """The curvature operator ``curvature`` names (or returns) at the objective's point."""
    if callable(curvature):
        return curvature(obj)
    if curvature in ("kfac", "ekfac"):
        return kronecker_operator(obj, curvature, "ggn")
    return curvature_operator(obj, curvature, "gns_newton")


@torch.no_grad()
def _assign(obj: Any, x: torch.Tensor) -> None:
    """Write the flat ``(d,)`` parameters ``x`` into the objective, in place."""
    for name, t in obj.space.split(x).items():
        obj.params[name].copy_(t)


class GNSNewton(torch.optim.Optimizer):
    r"""Gradient-regularized Newton steps with the adaptive :math:`\gamma` of Algorithm 1.

    Each :meth:`step` solves :math:`(H + \frac{\|g\|}{\gamma} I)\Delta = -g` by CG on
    mini-batch Hessian-vector products (double backward), tries :math:`\theta + \Delta`, and
    keeps it iff :func:`gns_accept` holds for the closure's loss and gradient there, doubling
    :math:`\gamma`; otherwise halves :math:`\gamma` and re-solves (at most 40 times, then
    leaves the parameters unchanged). Semenov, Jaggi & Doikov (2025), "Gradient-Normalized
    Smoothness for Optimization with Approximate Hessians". For GGN, Fisher or KFAC
    curvature on the full data, use :func:`gns_newton`.

    Args:
        params: Parameters or parameter groups.
        gamma: Initial :math:`\gamma > 0`.
        max_matvecs: Hessian-vector products per solve.
        tol: CG's relative residual tolerance.

    Raises:
        ValueError: ``gamma <= 0``.

    Example:
        >>> import torch
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        >>> opt = GNSNewton([x])
        >>> for _ in range(30):
        ...     _ = opt.step(lambda: 0.5 * x @ A @ x - x.sum())
        >>> torch.allclose(x.detach(), torch.linalg.solve(A, torch.ones(2, dtype=torch.float64)))
        True
    """

    def __init__(self, params, gamma: float = 1.0, max_matvecs: int = 50, tol: float | None = None):
        if not gamma > 0:
            raise ValueError(f"GNSNewton: gamma must be > 0, got {gamma!r}.")
        super().__init__(params, {})
        self.gamma, self.max_matvecs, self.tol = float(gamma), int(max_matvecs), tol

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> torch.Tensor:  # type: ignore[override]
        """One accepted step (or none); the closure returns the loss (no backward).

        Parameters that the loss does not reach have no gradient and are left unchanged.
        """
        every = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        loss, _ = _closure.call(closure, "GNSNewton")
        with torch.enable_grad():
            grads = _closure.gradients(loss, every, "GNSNewton", create_graph=True)
        params = [p for p, gi in zip(every, grads, strict=True) if gi is not None]
        reached = [gi for gi in grads if gi is not None]
        g = torch.cat([gi.detach().reshape(-1) for gi in reached])
        if not torch.any(g):  # a stationary point: lambda = 0 and nothing to step along
            return loss.detach()
        H, start = _GraphHessian(reached, params), [p.detach().clone() for p in params]
        for _ in range(_MAX_SEARCH):
            with torch.enable_grad():
                delta, lam, _ = gns_step(
                    H, g, self.gamma, tol=self.tol, max_matvecs=self.max_matvecs
                )
            new_loss, g_new_norm = _try_point(closure, params, start, delta)
            if gns_accept(float(loss), float(new_loss), g_new_norm, lam, g_norm=float(g.norm())):
                self.gamma *= 2
                return new_loss.detach()
            self.gamma /= 2
        for p, p0 in zip(params, start, strict=True):
            p.copy_(p0)
        return loss.detach()


def _try_point(
    closure: Callable | None,
    params: list[torch.Tensor],
    start: list[torch.Tensor],
    delta: torch.Tensor,
) -> tuple[torch.Tensor, float]:
    """Move ``params`` to ``start + delta`` (flat ``(d,)``); the closure's loss and gradient norm.

    Gradients of parameters the loss no longer reaches count as zero in the norm.
    """
    for p, p0, d in zip(params, start, delta.split([p.numel() for p in params]), strict=True):
        p.copy_(p0 + d.view_as(p))
    new_loss, _ = _closure.call(closure, "GNSNewton")
    with torch.enable_grad():
        g_new = _closure.gradients(new_loss, params, "GNSNewton")
    return new_loss, float(torch.cat([gi.reshape(-1) for gi in g_new if gi is not None]).norm())
