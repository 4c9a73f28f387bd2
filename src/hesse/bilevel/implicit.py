r"""Implicit-function hypergradients with CG (approximate implicit differentiation, AID).

The baseline the single-loop methods are measured against, and the functional twin of
:func:`hesse.influence.hypergradient` (which takes ``Objective``\ s and a penalty): each outer
step runs ``inner_steps`` gradient steps on every block's :math:`g_i` from the last
:math:`y_i` (warm start), solves :math:`\nabla^2_{yy} g_i\, u_i = \nabla_y f_i` by conjugate
gradients (:func:`hesse.solve`, started from the last :math:`u_i`), and steps

.. math::
    x \leftarrow \Pi_X\Big(x - \eta\, \frac1m \sum_i
        \big(\nabla_x f_i - \nabla^2_{xy} g_i\, u_i\big)\Big)

(Pedregosa 2016, "Hyperparameter optimization with approximate gradient"; Grazzi et al. 2020,
"On the iteration complexity of hypergradient computation"). Every evaluation uses all of a
block's data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linalg import solve
from ..operators import PSD, SYMMETRIC, Operator
from ._oracle import Oracle, require_positive


@dataclass(frozen=True)
class ImplicitOptions:
    r"""Steps and CG budget of :func:`hesse.bilevel.solve` with ``method="implicit"``.

    Attributes:
        lr: :math:`\eta`, the upper-level step.
        inner_lr: The lower-level gradient step.
        inner_steps: Lower-level steps per outer step.
        tol: CG's relative residual tolerance.
        max_matvecs: Hessian-vector products per CG solve (at least 2).
    """

    lr: float = 0.1
    inner_lr: float = 0.1
    inner_steps: int = 10
    tol: float = 1e-6
    max_matvecs: int = 50

    def check(self, blocks: int) -> None:
        """Refuse non-positive steps and budgets below CG's minimum."""
        require_positive(self, ("lr", "inner_lr", "tol"))
        if self.inner_steps < 0 or self.max_matvecs < 2:
            raise ValueError(
                "ImplicitOptions: inner_steps must be >= 0 and max_matvecs >= 2, got "
                f"{self.inner_steps} and {self.max_matvecs}."
            )


class _LowerHessian(Operator):
    r""":math:`\nabla^2_{yy} g_i` at one point, flat; PSD because the lower level must be convex."""

    def __init__(self, oracle: Oracle, x, y, batch):
        super().__init__(y.numel(), y.dtype, y.device, (SYMMETRIC, PSD))
        self.shape_y = y.shape
        self.products = oracle.hessian(x, y, batch)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        U = V.T.reshape(V.shape[1], *self.shape_y).movedim(0, -1)
        return self.products(U).reshape(-1, V.shape[1])


class ImplicitRun:
    """The state of one AID run: ``x``, ``Y``, the last CG solutions ``U``."""

    def __init__(self, oracle: Oracle, x, Y, options: ImplicitOptions, gen, project):
        options.check(oracle.blocks)
        self.o, self.opt, self.project = oracle, options, project
        self.x, self.Y, self.U = x.clone(), Y.clone(), torch.zeros_like(Y)
        self.all_converged = True
        self.max_residual = 0.0

    def step(self) -> None:
        """Inner steps, one CG solve per block, one hypergradient step."""
        o, opt, G = self.o, self.opt, []
        for i in range(o.blocks):
            bf, bg = o.batch(i, None)
            y = self.Y[i]
            for _ in range(opt.inner_steps):
                y = y - opt.inner_lr * o.grad_lower(self.x, y, bg)[1]
            self.Y[i] = y
            fx, fy = o.grad_upper(self.x, y, bf)
            H = _LowerHessian(o, self.x, y, bg)
            r = solve(
                H,
                fy.reshape(-1),
                tol=opt.tol,
                max_matvecs=opt.max_matvecs,
                x0=self.U[i].reshape(-1),
            )
            self.all_converged &= r.converged
            rel = float(r.residual_norm.max()) / max(float(fy.norm()), 1e-300)
            self.max_residual = max(self.max_residual, rel)
            self.U[i] = r.value.reshape(y.shape)
            G.append(fx - o.mixed(self.x, y, self.U[i], bg))
        self.x = self.project(self.x - opt.lr * torch.stack(G).mean(0))
