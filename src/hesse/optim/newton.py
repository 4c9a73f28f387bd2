"""Regularized Newton steps solved by conjugate gradients on Hessian-vector products."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..linalg import SolveResult, solve
from ..operators.base import SYMMETRIC, Operator
from . import _closure


class NewtonCG(torch.optim.Optimizer):
    r"""Regularized Newton steps, solved by conjugate gradients on Hessian-vector products.

    The step is :math:`\theta \leftarrow \theta + \eta\, s` with
    :math:`(H + \lambda_t I)\, s = -g`, solved by CG (:func:`hesse.solve`), and

    .. math:: \lambda_t = \lambda + \sqrt{L\, \|g_t\|}

    The gradient-regularized choice :math:`\sqrt{L \|g\|}` (Mishchenko 2023, "Regularized
    Newton Method with Global O(1/k^2) Convergence"; Doikov & Nesterov 2024 with approximate
    Hessians, the "gradient-normalized smoothness" line) makes the step globally convergent
    for an :math:`L`-Lipschitz Hessian; ``damping`` :math:`\lambda` is a floor. The Hessian is
    the mini-batch Hessian of the closure's loss, applied by double backward on one graph
    (``max_matvecs`` products at most). CG stops at the first direction of non-positive
    curvature of :math:`H + \lambda_t I` and keeps the iterate it has, or takes :math:`-g`
    when that happens on the first direction (Nocedal & Wright 2006, Algorithm 7.1), so an
    indefinite Hessian still gives a descent direction. ``last_solve`` holds the last
    :class:`hesse.SolveResult` (converged, products, residual).

    Args:
        params: Parameters or parameter groups (a group's ``lr`` scales its slice of ``s``).
        lr: Step scale :math:`\eta` (1 = the full Newton step).
        damping: :math:`\lambda > 0`.
        regularization: :math:`L \ge 0`.
        max_matvecs: Hessian-vector products per step (at least 2).
        tol: CG's relative residual tolerance.

    Raises:
        ValueError: damping not positive, or regularization negative.

    Example:
        >>> import torch
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        >>> opt = NewtonCG([x], damping=1e-12, max_matvecs=10)
        >>> loss = opt.step(lambda: 0.5 * x @ A @ x - x.sum())
        >>> torch.allclose(x.detach(), torch.linalg.solve(A, torch.ones(2, dtype=torch.float64)))
        True
    """

    def __init__(
        self,
        params,
        lr: float = 1.0,
        damping: float = 1e-3,
        regularization: float = 0.0,
        max_matvecs: int = 20,
        tol: float | None = None,
    ):
        if not damping > 0 or regularization < 0:
            raise ValueError(
                f"NewtonCG: need damping > 0 and regularization >= 0, got damping={damping}, "
                f"regularization={regularization}."
            )
        super().__init__(params, dict(lr=lr))
        self.damping, self.regularization = float(damping), float(regularization)
        self.max_matvecs, self.tol = int(max_matvecs), tol
        self.last_solve: SolveResult | None = None

    # torch's stub types the closure's loss as a float; it is a tensor, as in torch.optim
    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> torch.Tensor:  # type: ignore[override]
        """One regularized Newton step; the closure returns the loss (no backward).

        Parameters that the loss does not reach have no gradient and are left out of the
        system and of the step, as ``torch.optim`` skips them.
        """
        entries = [(p, g["lr"]) for g in self.param_groups for p in g["params"] if p.requires_grad]
        loss, _ = _closure.call(closure, "NewtonCG")
        with torch.enable_grad():
            grads = _closure.gradients(loss, [p for p, _ in entries], "NewtonCG", create_graph=True)
            used = [i for i, gi in enumerate(grads) if gi is not None]
            params = [entries[i][0] for i in used]
            reached = [gi for gi in grads if gi is not None]  # the gradients of params
            g = torch.cat([gi.reshape(-1) for gi in reached])
            lam = self.damping + math.sqrt(self.regularization * float(g.detach().norm()))
            H = _GraphHessian(reached, params)
            self.last_solve = solve(
                H, -g.detach(), damping=lam, method="cg", tol=self.tol, max_matvecs=self.max_matvecs
            )
        s = self.last_solve.value
        if not torch.any(s):  # negative curvature along -g itself: CG took no step
            s = -g.detach()
        for i, s_p in zip(used, s.split([p.numel() for p in params]), strict=True):
            p, lr = entries[i]
            p.add_(lr * s_p.view_as(p))
        return loss.detach()


class _GraphHessian(Operator):
    """The Hessian of one mini-batch loss, from double backward through its gradient graph."""

    def __init__(self, grads: Sequence[torch.Tensor], params: list[torch.Tensor]):
        d = sum(p.numel() for p in params)
        super().__init__(d, params[0].dtype, params[0].device, tags=(SYMMETRIC,))
        self.grads, self.params = grads, params

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._matvec(v) for v in V.T], dim=1)

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        pieces, start = [], 0
        for p in self.params:
            pieces.append(v[start : start + p.numel()].view_as(p))
            start += p.numel()
        Hv = torch.autograd.grad(
            self.grads, self.params, pieces, retain_graph=True, allow_unused=True
        )
        return torch.cat(
            [
                v.new_zeros(p.numel()) if h is None else h.reshape(-1)
                for p, h in zip(self.params, Hv, strict=True)
            ]
        )
