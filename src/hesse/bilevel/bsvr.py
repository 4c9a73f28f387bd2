r"""BSVRB: variance-reduced multi-block bilevel steps tracking :math:`H^{-1}v` by Hessian products.

Hu, Zhu & Yang 2023, "Blockwise Stochastic Variance-Reduced Methods with Parallel Speedup for
Multi-Block Bilevel Optimization" (ICML), the high-dimensional variant (their BSVRB\ :sup:`v2`):
no Hessian is formed or inverted. For :math:`F(x) = \frac1m\sum_i f_i(x, y_i^*(x))`,
:math:`y_i^*(x) = \arg\min_y g_i(x, y)`, the hypergradient of block :math:`i` is

.. math::
    \nabla F_i = \nabla_x f_i - \nabla^2_{xy} g_i\, u_i^*, \qquad
    u_i^* = (\nabla^2_{yy} g_i)^{-1} \nabla_y f_i
          = \arg\min_u \tfrac12 u^\top \nabla^2_{yy} g_i\, u - u^\top \nabla_y f_i,

and :math:`u_i` is *tracked* by stochastic gradient steps on that quadratic, whose gradient
:math:`q_i = \nabla^2_{yy} g_i\, u_i - \nabla_y f_i` costs one Hessian-vector product. Each step
samples :math:`I` of the :math:`m` blocks and one mini-batch :math:`\xi_i` per sampled block,
and for each sampled block keeps MSVR estimators (Jiang et al. 2022, "Multi-block-single-probe
variance reduced estimator") of :math:`\nabla_y g_i` and of :math:`q_i`,

.. math::
    v_i \leftarrow (1-\beta) v_i + \beta\, \nabla_y g_i(x_t, y_{i,t}; \xi_i)
        + \gamma \big(\nabla_y g_i(x_t, y_{i,t}; \xi_i)
        - \nabla_y g_i(x_{t-1}, y_{i,t-1}; \xi_i)\big),
    \quad \gamma = \frac{m - I}{I (1-\beta)} + (1 - \beta),

(:math:`s_i` likewise for :math:`q_i`, evaluated at :math:`(x, y_i, u_i)`), then steps
:math:`y_i \leftarrow y_i - \tau v_i`, :math:`u_i \leftarrow \Pi_{\|u\| \le C}(u_i - \tau_u s_i)`.
The upper level uses the STORM estimator (Cutkosky & Orabona 2019) of the sampled
hypergradient :math:`G_t = \frac1I \sum_{i \in I_t} \nabla_x f_i - \nabla^2_{xy} g_i\, u_i`:

.. math::
    z_t = \beta_x G_t + (1-\beta_x)\big(z_{t-1} + G_t - G_{t-1}(\xi)\big), \qquad
    x_{t+1} = \Pi_X(x_t - \eta z_t),

where :math:`G_{t-1}(\xi)` is the same samples at the previous iterate. With ``beta = 1`` and
``beta_x = 1`` the corrections vanish and the previous point is not evaluated (plain stochastic
steps); with full batches and all blocks sampled the estimators are exact for any ``beta``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._oracle import Oracle, require_positive


@dataclass(frozen=True)
class BSVROptions:
    r"""Step sizes and estimator weights of :func:`hesse.bilevel.solve` with ``method="bsvr"``.

    Attributes:
        lr: :math:`\eta`, the upper-level step.
        inner_lr: :math:`\tau`, the lower-level step.
        ihvp_lr: :math:`\tau_u`, the step of the tracked :math:`H^{-1}v` (default ``inner_lr``).
        beta: :math:`\beta \in (0, 1]`, MSVR weight of the lower-level estimators.
        beta_x: :math:`\beta_x \in (0, 1]`, STORM weight of the hypergradient estimator.
        blocks_per_step: :math:`I`, blocks sampled per step (default all). MSVR scales its
            correction by :math:`\gamma \approx m / I`, so with :math:`I < m` the steps must
            shrink like :math:`I / m` (``benchmarks/bilevel/blocks.py`` measures it).
        u_radius: :math:`C`, the ball the tracked products are projected on (None: none).
    """

    lr: float = 0.1
    inner_lr: float = 0.1
    ihvp_lr: float | None = None
    beta: float = 0.5
    beta_x: float = 0.5
    blocks_per_step: int | None = None
    u_radius: float | None = None

    def check(self, blocks: int) -> None:
        """Refuse weights outside :math:`(0, 1]`, non-positive steps or too many blocks."""
        for name, value in (("beta", self.beta), ("beta_x", self.beta_x)):
            if not 0 < value <= 1:
                raise ValueError(
                    f"BSVROptions: {name} must be in (0, 1], got {value!r} (1: no variance "
                    "reduction; 0.5 is the default)."
                )
        require_positive(self, ("lr", "inner_lr"))
        n = self.blocks_per_step or blocks
        if not 1 <= n <= blocks:
            raise ValueError(f"BSVROptions: blocks_per_step must be in 1..{blocks}, got {n}.")
        if n < blocks and self.beta == 1:
            raise ValueError(
                "BSVROptions: beta=1 with block sampling makes MSVR's gamma infinite; "
                "pass beta < 1 (e.g. 0.5) or blocks_per_step=None (all blocks)."
            )


class BSVRRun:
    """The state of one BSVRB run: ``x``, ``Y``, tracked ``U`` and the estimators."""

    def __init__(self, oracle: Oracle, x, Y, options: BSVROptions, gen, project):
        options.check(oracle.blocks)
        self.o, self.opt, self.gen, self.project = oracle, options, gen, project
        self.x, self.Y, self.U = x.clone(), Y.clone(), torch.zeros_like(Y)
        self.I = options.blocks_per_step or oracle.blocks
        b, m = options.beta, oracle.blocks
        self.gamma = 0.0 if b == 1 else (m - self.I) / (self.I * (1 - b)) + (1 - b)
        self.V, self.S = torch.zeros_like(Y), torch.zeros_like(Y)
        G = []
        for i in range(m):  # every estimator starts at one sample of its quantity
            self.V[i], self.S[i], Gi = self._terms(i, x, self.Y[i], self.U[i], oracle.batch(i, gen))
            G.append(Gi)
        self.z = torch.stack(G).mean(0)
        self.prev: tuple | None = None

    def _terms(self, i, x, y, u, batch):
        r"""``(∇_y g_i, q_i, G_i)`` at ``(x, y, u)`` on one mini-batch."""
        fx, fy = self.o.grad_upper(x, y, batch[0])
        gy, Hu, Jxu = self.o.lower_products(x, y, u, batch[1])
        return gy, Hu - fy, fx - Jxu

    def step(self) -> None:
        """One iteration: sample blocks, update the estimators, then ``Y``, ``U`` and ``x``."""
        o, opt, b, bx = self.o, self.opt, self.opt.beta, self.opt.beta_x
        idx = torch.randperm(o.blocks, generator=self.gen)[: self.I].tolist()
        need_prev = self.prev is not None and (b < 1 or bx < 1)
        G, G_prev = [], []
        for i in idx:
            batch = o.batch(i, self.gen)
            gy, q, Gi = self._terms(i, self.x, self.Y[i], self.U[i], batch)
            self.V[i] = (1 - b) * self.V[i] + b * gy
            self.S[i] = (1 - b) * self.S[i] + b * q
            if need_prev:
                xp, Yp, Up = self.prev  # type: ignore[misc]
                gy_p, q_p, G_p = self._terms(i, xp, Yp[i], Up[i], batch)
                self.V[i] += self.gamma * (gy - gy_p)
                self.S[i] += self.gamma * (q - q_p)
                G_prev.append(G_p)
            G.append(Gi)
        Gt = torch.stack(G).mean(0)
        correction = torch.stack(G_prev).mean(0) if need_prev else self.z
        self.z = bx * Gt + (1 - bx) * (self.z + Gt - correction)
        self.prev = (self.x, self.Y.clone(), self.U.clone())
        tau_u = opt.ihvp_lr or opt.inner_lr
        for i in idx:
            self.Y[i] = self.Y[i] - opt.inner_lr * self.V[i]
            self.U[i] = _ball(self.U[i] - tau_u * self.S[i], opt.u_radius)
        self.x = self.project(self.x - opt.lr * self.z)


def _ball(u: torch.Tensor, radius: float | None) -> torch.Tensor:
    """``u`` projected onto the Euclidean ball of ``radius`` (unchanged for None)."""
    if radius is None:
        return u
    n = float(u.norm())
    return u if n <= radius else u * (radius / n)
