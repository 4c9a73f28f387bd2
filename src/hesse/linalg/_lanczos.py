r"""The Lanczos core of ``eigs`` and ``density``: block Krylov bases kept in float64.

One :class:`Lanczos` object is one (block) Krylov sequence. It keeps the relation

.. math:: A V = V H + F C + L G + U D,

where ``V`` ``(d, n)`` is the orthonormal closed basis, ``F`` ``(d, b)`` the frontier (the
newest block, orthonormal to ``V``, whose product is not yet known), ``H = H^T`` ``(n, n)`` the
projected matrix, ``C`` ``(b, n)`` the coupling to the frontier, ``L`` the locked vectors the
sequence is kept orthogonal to and ``G`` the parts of the products removed along them, and
``U`` unit vectors dropped from the sequence (residuals at a breakdown, frontier vectors cut by
the budget) with their couplings ``D``. All the small matrices follow every restart exactly.
For a Ritz pair :math:`(\theta, x = V s)` of ``H`` this gives the bound

.. math::
    \|A x - \theta x\| \le \|C s\| + \|G s\| + \|D s\|_1 + \varepsilon\,\|A\|,

whose last term, one unit of round-off of the product dtype, stands for the error of the
computed products (the relation holds exactly for the computed ones). The basis, its inner
products and norms are float64 whatever the operator's dtype; only ``A @ F`` runs in the
operator's dtype (Paige 1976: the accuracy of Lanczos is set by the arithmetic of its basis).

Every new vector is orthogonalized against the basis with the DGKS test (Daniel, Gragg, Kaufman
& Stewart 1976): another pass only when a pass shrank the vector by more than
:math:`1/\sqrt{2}`. A breakdown (an invariant subspace) is declared only when the residual is
at the round-off level of the product dtype, :math:`\|w\| \le 4\,\varepsilon\,\|A\|`; its norm
stays in the bounds (it is never set to zero).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._util import Counted, gaussian

F64 = torch.float64
BREAKDOWN = 4.0  # units of round-off of the product dtype, relative to ||A||
ROWS = 1 << 16  # rows per chunk when a restart rotates the basis in place


def basis_dtype(device: torch.device) -> torch.dtype:
    """float64, except on Apple's MPS, which has no float64."""
    return torch.float32 if torch.device(device).type == "mps" else F64


class Lanczos:
    """One block Krylov sequence with full reorthogonalization.

    Args:
        op: The counted operator.
        capacity: Most closed basis vectors; the buffer holds ``capacity + b`` columns.
        start: ``(d, b)`` start block; dependent or zero columns are replaced by random ones.
        gen: Generator of random replacement vectors.
        locked: ``(d, l)`` orthonormal vectors the sequence stays orthogonal to.
        anorm: A known lower estimate of ``||A||``.
    """

    def __init__(
        self,
        op: Counted,
        capacity: int,
        start: torch.Tensor,
        gen: torch.Generator,
        locked: torch.Tensor | None = None,
        anorm: float = 0.0,
    ):
        self.op, self.gen, self.anorm = op, gen, anorm
        self.eps = torch.finfo(op.dtype).eps
        width = capacity + start.shape[1]
        self.V = torch.zeros(op.d, width, dtype=basis_dtype(op.device), device=op.device)
        self.L = torch.zeros(op.d, 0, dtype=self.V.dtype, device=op.device)
        self.L = self.L if locked is None else locked.to(self.V)
        self.n, self.b = 0, 0
        self.H = torch.zeros(0, 0, dtype=F64)
        self.C = torch.zeros(0, 0, dtype=F64)
        self.G = torch.zeros(self.L.shape[1], 0, dtype=F64)
        self.D = torch.zeros(0, 0, dtype=F64)
        for z in start.T:
            if not self.append(z):
                self.append()

    @property
    def frontier(self) -> torch.Tensor:
        """``(d, b)`` the block whose product comes next."""
        return self.V[:, self.n : self.n + self.b]

    @property
    def room(self) -> int:
        """Directions left: ``d`` minus the basis, the frontier and the locked vectors."""
        return self.op.d - self.n - self.b - self.L.shape[1]

    def append(self, z: torch.Tensor | None = None) -> bool:
        """Add ``z`` (default: a random vector) to the frontier, uncoupled; False if dependent."""
        if self.room <= 0:
            return False
        if z is None:
            z = gaussian(self.gen, self.op.d, 1, self.op, self.V.dtype)[:, 0]
        z = z.to(self.V)
        size = float(torch.linalg.vector_norm(z))
        _, _, z, norm = orthogonalize(z, self.V[:, : self.n + self.b], self.L)
        if not norm > 1e-10 * size:
            return False
        self.V[:, self.n + self.b] = z / norm
        self.C = torch.cat([self.C, torch.zeros(1, self.n, dtype=F64)])
        self.b += 1
        return True

    def shrink(self, b: int) -> None:
        """Keep only the first ``b`` frontier vectors; the others join ``U``."""
        self.D = torch.cat([self.D, self.C[b:]])
        self.C, self.b = self.C[:b], b

    def absorb(self, W: torch.Tensor) -> None:
        """Take ``W = A F`` ``(d, b)``: close the frontier and make the next one."""
        n, b = self.n, self.b
        if not bool(torch.isfinite(W).all()):
            raise ValueError(
                "Lanczos: the operator returned nan or inf for a unit vector; check the "
                "operator (a half-precision one may overflow: try float32)."
            )
        W = W.to(self.V)
        self.anorm = max(self.anorm, float(torch.linalg.vector_norm(W, dim=0).max()))
        floor = BREAKDOWN * self.eps * self.anorm
        coef = torch.zeros(n + 2 * b, b, dtype=F64)
        G = torch.zeros(self.L.shape[1], b, dtype=F64)
        D = torch.zeros(0, b, dtype=F64)
        a = 0
        for j in range(b):
            h, G[:, j], w, beta = orthogonalize(W[:, j], self.V[:, : n + b + a], self.L)
            coef[: n + b + a, j] = h
            if beta > floor:
                self.V[:, n + b + a] = w / beta
                coef[n + b + a, j] = beta
                a += 1
            else:  # an invariant subspace, up to round-off: drop w, keep its norm in D
                D = torch.cat([D, beta * torch.eye(b, dtype=F64)[j : j + 1]])
        self._grow(coef[n : n + b], coef[n + b : n + b + a], G, D)

    def _grow(self, Y: torch.Tensor, R: torch.Tensor, G: torch.Tensor, D: torch.Tensor) -> None:
        """Border ``H`` with the new block ``Y``.

        By symmetry its coupling to ``V`` is ``C^T``; the computed one differs from it by the
        round-off of the products, which the bound's round-off term stands for.
        """
        n, b = self.n, self.b
        H = torch.zeros(n + b, n + b, dtype=F64)
        H[:n, :n] = self.H
        H[n:, :n] = self.C
        H[:n, n:] = self.C.T
        H[n:, n:] = (Y + Y.T) / 2
        self.G = torch.cat([self.G, G], 1)
        self.D = torch.cat([self.D, torch.zeros(self.D.shape[0], b, dtype=F64)], 1)
        self.D = torch.cat([self.D, torch.cat([torch.zeros(D.shape[0], n, dtype=F64), D], 1)])
        self.C = torch.cat([torch.zeros(R.shape[0], n, dtype=F64), R], 1)
        self.H, self.n, self.b = H, n + b, R.shape[0]

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ritz values ``(n,)`` ascending, coefficients ``S`` ``(n, n)``, bounds ``(n,)``."""
        theta, S = torch.linalg.eigh(self.H)
        if theta.numel():
            self.anorm = max(self.anorm, float(theta.abs().max()))
        norm = torch.linalg.vector_norm
        bounds = norm(self.C @ S, dim=0) + norm(self.G @ S, dim=0) + (self.D @ S).abs().sum(0)
        return theta, S, bounds + self.eps * self.anorm

    def vectors(self, S: torch.Tensor) -> torch.Tensor:
        """Unit Ritz vectors ``V S`` ``(d, j)``, normalized in float64."""
        X = self.V[:, : self.n] @ S.to(self.V)
        return X / torch.linalg.vector_norm(X, dim=0)

    def restart(self, theta: torch.Tensor, S: torch.Tensor, keep: torch.Tensor) -> None:
        """Thick restart (Wu & Simon 2000): keep the Ritz vectors ``keep`` and the frontier."""
        n, b, p = self.n, self.b, len(keep)
        Sk = S[:, keep]
        Sd = Sk.to(self.V)
        for r in range(0, self.op.d, ROWS):  # in place, without a (d, p) copy of the basis
            rows = self.V[r : r + ROWS]
            front = rows[:, n : n + b].clone()
            rows[:, :p] = rows[:, :n] @ Sd
            rows[:, p : p + b] = front
        self.H = torch.diag(theta[keep])
        self.C, self.G, self.D = self.C @ Sk, self.G @ Sk, self.D @ Sk
        self.n = p


def orthogonalize(
    w: torch.Tensor, Q: torch.Tensor, L: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Remove from ``w`` its components along ``Q`` ``(d, n)`` and ``L`` ``(d, l)`` (DGKS test).

    Returns:
        ``(h, g, w, norm)``: the float64 coefficients along ``Q`` ``(n,)`` and ``L`` ``(l,)`` on
        the CPU, the orthogonal remainder and its norm.
    """
    h = torch.zeros(Q.shape[1], dtype=Q.dtype, device=Q.device)
    g = torch.zeros(L.shape[1], dtype=Q.dtype, device=Q.device)
    norm = float(torch.linalg.vector_norm(w))
    for _ in range(3):
        for B, coef in ((Q, h), (L, g)):
            if B.shape[1]:
                c = B.T @ w
                w = w - B @ c
                coef += c
        new = float(torch.linalg.vector_norm(w))
        if new > norm / math.sqrt(2) or new == 0.0:
            break
        norm = new
    return h.cpu().to(F64), g.cpu().to(F64), w, new


def step(runs: Sequence[Lanczos], op: Counted) -> None:
    """Advance every run by one block: all frontiers go through ``op`` as one product."""
    live = [lz for lz in runs if lz.b > 0]
    if not live:
        return
    W = op(torch.cat([lz.frontier for lz in live], 1))
    for lz, w in zip(live, W.split([lz.b for lz in live], 1), strict=True):
        lz.absorb(w)
