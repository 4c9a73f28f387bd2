r"""LV-HBA: a Hessian-free single-loop method for a lower level with coupled constraints.

Yao, Yu, Zeng & Zhang 2024, "Constrained Bi-Level Optimization: Proximal Lagrangian Value
function Approach and Hessian-free Algorithm" (ICLR). For

.. math::
    \min_{x, y} F(x, y) \quad\text{s.t.}\quad
    y \in \arg\min_{\theta} \{ f(x, \theta) : c(x, \theta) \le 0 \},

with the lower level convex in :math:`\theta` and :math:`c : (x, \theta) \to \mathbb{R}^l`, the
proximal Lagrangian value function

.. math::
    v_\gamma(x, y, z) = \min_\theta \max_{\lambda \ge 0}\;
        f(x, \theta) + \lambda^\top c(x, \theta) + \frac{1}{2\gamma_1}\|\theta - y\|^2
        - \frac{1}{2\gamma_2}\|\lambda - z\|^2

is smooth, and the bilevel problem becomes :math:`\min F` s.t. :math:`f(x,y) - v_\gamma(x,y,z)
\le 0`. LV-HBA keeps :math:`(\theta, \lambda)` one step from the saddle point and descends the
penalized objective :math:`F/c_k + f - v_\gamma` with :math:`c_k = \underline{c}\,(k+1)^p`,
using only gradients (by Danskin's theorem the gradient of :math:`v_\gamma` is the Lagrangian's
at the saddle point), and projecting :math:`(x, y)` on :math:`C = \{c(x, y) \le 0\}`:

.. math::
    \theta_{k+1} &= \theta_k - \eta\big(\nabla_\theta f(x_k, \theta_k)
        + \nabla_\theta c(x_k, \theta_k)^\top \lambda_k + (\theta_k - y_k)/\gamma_1\big), \\
    \lambda_{k+1} &= \max\big(0,\; z_k + \gamma_2\, c(x_k, \theta_{k+1})\big), \\
    (x_{k+1}, y_{k+1}) &= \Pi_C\big(\hat x_{k+1}, \hat y_{k+1}\big), \quad
    \hat x_{k+1} = \Pi_X\Big(x_k - \alpha\big(\tfrac{1}{c_k}\nabla_x F(x_k, y_k)
        + \nabla_x f(x_k, y_k) - \nabla_x f(x_k, \theta_{k+1})
        - \nabla_x c(x_k, \theta_{k+1})^\top\lambda_{k+1}\big)\Big), \\
    \hat y_{k+1} &= y_k - \alpha\big(\tfrac{1}{c_k}\nabla_y F(x_k, y_k) + \nabla_y f(x_k, y_k)
        - (y_k - \theta_{k+1})/\gamma_1\big), \\
    z_{k+1} &= \max\big(0,\; z_k - \beta (z_k - \lambda_{k+1})/\gamma_2\big).

:math:`\lambda_{k+1}` is the exact maximizer over :math:`\lambda` at :math:`\theta_{k+1}` (the
dual part is a concave quadratic). At a fixed point :math:`z = \lambda`, so
:math:`\lambda = \max(0, \lambda + \gamma_2 c)` gives :math:`c(x, \theta) \le 0` with
complementary slackness, and :math:`y = \theta`. The projection on :math:`C` matters: without
it :math:`f - v_\gamma` is not a gap (it goes negative for an infeasible :math:`y`) and the
iterates leave. We project by ``projection_sweeps`` simultaneous steps onto the linearized
violated constraints, :math:`w \leftarrow w - \sum_{j: c_j > 0} c_j \nabla c_j / \|\nabla c_j\|^2`
with :math:`w = (x, y)`: exact for constraints affine in :math:`(x, y)` whose gradients are
orthogonal (bounds, :math:`y_j \le x_j`, one constraint), a feasible-leaning approximation
otherwise; ``BilevelResult.violation`` reports how far the constraint holds at the end.

These updates are the ones of the authors' code (``SUSTech-Optimization/LV-HBA``, the
coupled-constraint toy problem): the same order (:math:`\theta` with the old multiplier, then
the multiplier at the new :math:`\theta`, then :math:`(x, y)`, the projection, :math:`z`) and the
same :math:`1/c_k` weighting of :math:`F`, except that their multiplier takes one projected
gradient-ascent step of size :math:`\eta` where we take the exact maximizer (the same fixed
point, and no step size to tune).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._oracle import Oracle, _grads, _leaf, _scalar, require_positive


@dataclass(frozen=True)
class LVHBAOptions:
    r"""Step sizes and penalty schedule of :func:`hesse.bilevel.solve` with ``method="lvhba"``.

    Attributes:
        lr: :math:`\alpha`, the step of :math:`(x, y)`.
        x_lr: A separate step for :math:`x` (default ``lr``): the paper uses one :math:`\alpha`;
            a separate one is a diagonal preconditioner, needed when :math:`x` and :math:`y`
            have gradients of different scales (per-sample weights get :math:`O(1/n)`).
        theta_lr: :math:`\eta`, the step of the lower-level copy :math:`\theta`.
        z_lr: :math:`\beta`, the step of the multiplier anchor :math:`z` (default ``lr``).
        gamma1: :math:`\gamma_1`, the proximal weight on :math:`\theta` (larger: closer to the
            plain value function, harder to solve).
        gamma2: :math:`\gamma_2`, the proximal weight on :math:`\lambda`.
        c: :math:`\underline{c}`, the first penalty; the upper objective is weighted
            :math:`1/c_k`.
        p: :math:`p \in [0, 1/2)`, the growth of :math:`c_k = \underline{c}\,(k+1)^p`.
        projection_sweeps: Linearized projection steps onto :math:`C` per iteration.
    """

    lr: float = 0.1
    x_lr: float | None = None
    theta_lr: float = 0.1
    z_lr: float | None = None
    gamma1: float = 1.0
    gamma2: float = 1.0
    c: float = 0.5
    p: float = 0.3
    projection_sweeps: int = 3

    def check(self, blocks: int) -> None:
        """Refuse non-positive steps and weights, and several blocks."""
        require_positive(self, ("lr", "theta_lr", "gamma1", "gamma2", "c"))
        if not 0 <= self.p < 0.5:
            raise ValueError(f"LVHBAOptions: p must be in [0, 0.5), got {self.p}.")
        if blocks != 1:
            raise ValueError(
                "bilevel.solve(method='lvhba') solves one lower-level problem, got "
                f"blocks={blocks}; "
                "use method='bsvr' for several blocks, or stack them into one lower level."
            )


class LVHBARun:
    """The state of one LV-HBA run: ``x``, ``y``, ``theta``, ``z`` and the step count."""

    def __init__(self, oracle: Oracle, x, Y, options: LVHBAOptions, gen, project, constraint):
        options.check(oracle.blocks)
        self.o, self.opt, self.gen, self.project = oracle, options, gen, project
        self.constrained = constraint is not None
        self.c = constraint or (lambda x, y: torch.zeros(0, dtype=y.dtype, device=y.device))
        self.x, self.Y = x.clone(), Y.clone()
        self.theta = Y[0].clone()
        n_con = self._constraint(x, self.theta).numel()
        self.z = torch.zeros(n_con, dtype=Y.dtype, device=Y.device)
        self.lam = self.z.clone()
        self.k = 0

    def _constraint(self, x, y) -> torch.Tensor:
        out = self.c(x, y)
        if not torch.is_tensor(out) or out.dim() > 1:
            raise ValueError(
                "bilevel.solve: constraint(x, y) must return a tensor of shape (l,) (feasible "
                f"where <= 0), got {tuple(out.shape) if torch.is_tensor(out) else type(out)}."
            )
        return out.reshape(-1)

    def _lagrangian(self, x, theta, lam, batch) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``(∇_x, ∇_θ)`` of :math:`f(x, \theta) + \lambda^\top c(x, \theta)`."""
        x, theta = _leaf(x), _leaf(theta)
        L = _scalar(self.o.lower(x, theta, batch), "lower") + lam @ self._constraint(x, theta)
        self.o.n_grads += 1
        gx, gt = _grads(L, (x, theta))
        return gx, gt

    def violation(self) -> float:
        r""":math:`\max(0, \max_j c_j(x, y))` (0 without constraints)."""
        with torch.no_grad():
            cv = self._constraint(self.x, self.Y[0])
        return float(cv.clamp_min(0).max()) if cv.numel() else 0.0

    def _toward_feasible(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """One simultaneous step onto every violated constraint's linearization."""
        x, y = _leaf(x), _leaf(y)
        cv = self._constraint(x, y)
        dx, dy = torch.zeros_like(x), torch.zeros_like(y)
        for j in (cv > 0).nonzero()[:, 0].tolist():
            ax, ay = _grads(cv[j], (x, y), retain_graph=True)  # keep the graph for the rest
            n2 = float((ax**2).sum() + (ay**2).sum())
            if n2 > 0:
                dx, dy = dx - cv[j].detach() * ax / n2, dy - cv[j].detach() * ay / n2
        return (x + dx).detach(), (y + dy).detach()

    def step(self) -> None:
        """One iteration of the updates in the module docstring."""
        o, opt, x, y = self.o, self.opt, self.x, self.Y[0]
        bF, bf = o.batch(0, self.gen)
        _, gt = self._lagrangian(x, self.theta, self.lam, bf)
        self.theta = self.theta - opt.theta_lr * (gt + (self.theta - y) / opt.gamma1)
        with torch.no_grad():
            self.lam = (self.z + opt.gamma2 * self._constraint(x, self.theta)).clamp_min(0)
        ck = opt.c * (self.k + 1) ** opt.p
        Fx, Fy = o.grad_upper(x, y, bF)
        fx, fy = o.grad_lower(x, y, bf)
        vx, _ = self._lagrangian(x, self.theta, self.lam, bf)
        x = self.project(x - (opt.x_lr or opt.lr) * (Fx / ck + fx - vx))
        y = y - opt.lr * (Fy / ck + fy - (y - self.theta) / opt.gamma1)
        for _ in range(opt.projection_sweeps if self.constrained else 0):
            x, y = self._toward_feasible(x, y)
        self.x, self.Y = x, y[None]
        z_lr = opt.z_lr or opt.lr
        self.z = (self.z - z_lr * (self.z - self.lam) / opt.gamma2).clamp_min(0)
        self.k += 1
