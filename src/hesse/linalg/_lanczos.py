r"""The Lanczos core of ``eigs`` and ``density``: block Krylov bases with float64 sums.

One :class:`Lanczos` object is one (block) Krylov sequence. It keeps the relation

.. math:: A V = V H + F C + L G + U D + V K,

where ``V`` ``(d, n)`` is the orthonormal closed basis, ``F`` ``(d, b)`` the frontier (the
newest block, orthonormal to ``V``, whose product is not yet known), ``H = H^T`` ``(n, n)`` the
projected matrix, ``C`` ``(b, n)`` the coupling to the frontier, ``L`` the locked vectors the
sequence is kept orthogonal to and ``G`` the parts of the products removed along them, and
``U`` unit vectors dropped from the sequence (residuals at a breakdown, frontier vectors cut by
the budget) with their couplings ``D``. All the small matrices follow every restart exactly.

``H`` is kept symmetric: a new block's coupling to ``V`` is written as ``C^T`` and its own
block as :math:`(Y + Y^T)/2`, where the product measured :math:`V^T A F` and ``Y``. What that
drops is ``V K`` ``(n, n)``: the run measures :math:`\langle A q_j, q_i\rangle - \langle A q_i,
q_j\rangle` for every pair of basis vectors at every step. An operator whose products differ
from symmetric by more than :math:`\sqrt{\varepsilon}\,\|A\|` is refused (``ValueError``);
below that, ``K`` joins the bound. A restart keeps the part of ``K`` along the kept vectors,
and moves the rest, which is orthogonal to them, into ``U D`` (as unit vectors with their
couplings). For a Ritz pair :math:`(\theta, x = V s)` of ``H``:

.. math::
    \|A x - \theta x\| \le \|C s\| + \|G s\| + \|K s\| + \|D s\|_1 + \varepsilon\,\|A\|.

With ``K`` the relation holds exactly for the computed products. Their own error ``E`` (``A F``
computed in the operator's dtype) is what the last term, one unit of round-off of the product
dtype, stands for: of ``E`` the run sees only its components along the basis (for a symmetric
operator they are all that ``K`` holds) and along the next direction (inside ``C``), not its
size as a whole; :math:`\varepsilon\,\|A\|` is the error of a product of a unit vector whose
entries are each rounded once. Products that carry a measured error of their own
(finite differences: ``Counted.error``, per unit input) add it to that term, and may be that
far from symmetric. The inner products and norms of the basis are
float64 sums whatever the operator's dtype; only ``A @ F`` runs in the operator's dtype (Paige
1976: the accuracy of Lanczos is set by the arithmetic of its basis). ``density`` stores the
basis in float64; ``eigs`` stores it in float32 for float32 (or lower) products where that
leaves room in its tolerance, and wherever ``basis_dtype=torch.float32`` asks (half the
memory): the sums then run over row chunks cast to float64 (``_util.chunk_rows``: never a
float64 copy of the basis, nor a temporary of more than 1 MiB), and the bounds add what
storing rounds away, :math:`\varepsilon_{\text{basis}} \sqrt{n}\,\|A\|`.

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

from ._util import Counted, chunk_rows, gaussian

F64 = torch.float64
BREAKDOWN = 4.0  # units of round-off of the product dtype, relative to ||A||
# A symmetric operator's products are symmetric up to a few units of round-off (a few
# thousand where its sums cancel, as a float32 Hessian's may); one that is not symmetric
# differs by a fraction of ||A||. sqrt(eps) (1.5e-8 in float64, 3.5e-4 in float32, 0.09 in
# bfloat16) lies far from both.
ASYMMETRY = 0.5  # the exponent of eps: the largest relative asymmetry accepted


def basis_dtype(device: torch.device, chosen: torch.dtype | None = None) -> torch.dtype:
    """``chosen``, or float64, except on Apple's MPS, which has no float64."""
    if chosen is not None:
        return chosen
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
        dtype = basis_dtype(op.device, op.basis_dtype)
        self.V = torch.zeros(op.d, width, dtype=dtype, device=op.device)
        # a basis stored below float64 loses orthogonality by its own round-off: bounds say so
        self.eps_basis = 0.0 if dtype == F64 else torch.finfo(dtype).eps
        no_lock = torch.zeros(op.d, 0, dtype=self.V.dtype, device=op.device)
        self.L = no_lock if locked is None else locked.to(self.V)
        self.n, self.b = 0, 0
        self.H = torch.zeros(0, 0, dtype=F64)
        self.C = torch.zeros(0, 0, dtype=F64)
        self.G = torch.zeros(self.L.shape[1], 0, dtype=F64)
        self.D = torch.zeros(0, 0, dtype=F64)
        self.K = torch.zeros(0, 0, dtype=F64)
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
        return self.op.dim - self.n - self.b - self.L.shape[1]

    def append(self, z: torch.Tensor | None = None) -> bool:
        """Add ``z`` (default: a random vector) to the frontier, uncoupled; False if dependent."""
        if self.room <= 0:
            return False
        if z is None:
            z = gaussian(self.gen, self.op.d, 1, self.op, self.V.dtype)[:, 0]
        z = z.to(self.V)
        size = float(self.op.norm(z))
        _, _, z, norm = orthogonalize(z, self.V[:, : self.n + self.b], self.L, self.op)
        if not norm > 1e-10 * size:
            return False
        self.V[:, self.n + self.b].copy_(z).div_(norm)
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
        self.anorm = max(self.anorm, float(self.op.norm(W, dim=0).max()))
        floor = BREAKDOWN * self.eps * self.anorm
        coef = torch.zeros(n + 2 * b, b, dtype=F64)
        G = torch.zeros(self.L.shape[1], b, dtype=F64)
        D = torch.zeros(0, b, dtype=F64)
        a = 0
        for j in range(b):
            h, G[:, j], w, beta = orthogonalize(W[:, j], self.V[:, : n + b + a], self.L, self.op)
            coef[: n + b + a, j] = h
            if beta > floor:
                self.V[:, n + b + a].copy_(w).div_(beta)
                coef[n + b + a, j] = beta
                a += 1
            else:  # an invariant subspace, up to round-off: drop w, keep its norm in D
                D = torch.cat([D, beta * torch.eye(b, dtype=F64)[j : j + 1]])
        Y = coef[n : n + b]
        K = torch.cat([coef[:n] - self.C.T, (Y - Y.T) / 2])
        self._refuse_asymmetry(K)
        self._grow(Y, coef[n + b : n + b + a], G, D, K)

    def _refuse_asymmetry(self, K: torch.Tensor) -> None:
        r"""Refuse an operator whose products are not symmetric up to round-off.

        Args:
            K: ``(n + b, b)`` what the new block's relation drops: :math:`V^T A F - C^T` (its
                measured coupling to ``V`` minus the one ``H`` gets, from the earlier products
                :math:`F^T A V`) above :math:`(Y - Y^T)/2`.

        Raises:
            ValueError: when :math:`\langle A q_j, q_i\rangle - \langle A q_i, q_j\rangle` exceeds
                :math:`\varepsilon^{1/2}\,\|A\|` for a pair.
        """
        n = self.n
        worst = max(float(K[:n].abs().max()) if n else 0.0, 2 * float(K[n:].abs().max()))
        # approximate products (finite differences) are symmetric only up to their error
        limit = max(self.eps**ASYMMETRY * self.anorm, 4 * self.op.error)
        if worst > limit:
            raise ValueError(
                f"{self.op.name or 'Lanczos'}: the operator is not symmetric: <A q_j, q_i> and "
                f"<A q_i, q_j> differ by {worst / self.anorm:.1e} relative to ||A|| (its "
                f"products' round-off explains at most {limit / self.anorm:.1e}); eigs and "
                "density need a symmetric operator. Pass (A + A^T) / 2 if A should be "
                "symmetric, or use a non-symmetric eigensolver (scipy.sparse.linalg.eigs)."
            )

    def _grow(
        self, Y: torch.Tensor, R: torch.Tensor, G: torch.Tensor, D: torch.Tensor, K: torch.Tensor
    ) -> None:
        """Border ``H`` with the new block: ``C^T`` beside ``V``, :math:`(Y + Y^T)/2` below."""
        n, b = self.n, self.b
        H = torch.zeros(n + b, n + b, dtype=F64)
        H[:n, :n] = self.H
        H[n:, :n] = self.C
        H[:n, n:] = self.C.T
        H[n:, n:] = (Y + Y.T) / 2
        self.K = torch.cat([torch.cat([self.K, torch.zeros(b, n, dtype=F64)]), K], 1)
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
        bounds = norm(self.C @ S, dim=0) + norm(self.G @ S, dim=0) + norm(self.K @ S, dim=0)
        # the products' own error, and what a basis stored below float64 rounds away
        stored = self.eps_basis * math.sqrt(self.n + self.b) * self.anorm
        rounding = self.eps * self.anorm + self.op.error + stored
        return theta, S, bounds + (self.D @ S).abs().sum(0) + rounding

    def vectors(self, S: torch.Tensor) -> torch.Tensor:
        """Unit Ritz vectors ``V S`` ``(d, j)``, normalized in float64 (in place: no copy)."""
        X = self.V[:, : self.n] @ S.to(self.V)
        return X.div_(self.op.norm(X, dim=0))

    def restart(self, theta: torch.Tensor, S: torch.Tensor, keep: torch.Tensor) -> None:
        """Thick restart (Wu & Simon 2000): keep the Ritz vectors ``keep`` and the frontier."""
        n, b, p = self.n, self.b, len(keep)
        Sk = S[:, keep]
        Sd = Sk.to(self.V)
        chunk = chunk_rows(n + b)
        for r in range(0, self.op.d, chunk):  # in place, without a (d, p) copy of the basis
            rows = self.V[r : r + chunk]
            front = rows[:, n : n + b].clone()
            rows[:, :p] = rows[:, :n] @ Sd
            rows[:, p : p + b] = front
        self.H = torch.diag(theta[keep])
        K = self.K @ Sk
        kept = Sk.T @ K  # the part along the kept vectors; the rest is orthogonal to them
        dropped = torch.linalg.qr(K - Sk @ kept, mode="r").R
        self.C, self.G, self.K = self.C @ Sk, self.G @ Sk, kept
        self.D = torch.cat([self.D @ Sk, dropped])
        self.n = p


def orthogonalize(
    w: torch.Tensor, Q: torch.Tensor, L: torch.Tensor, op: Counted
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    r"""Remove from ``w`` its components along ``Q`` and ``L`` (DGKS test).

    Classical Gram-Schmidt, repeated (at most three passes) while a pass shrinks ``w`` by more
    than :math:`1/\sqrt{2}`. ``w`` itself is left unchanged; the remainder is one new vector,
    updated in place by the later passes.

    Args:
        w: ``(d,)`` the vector, in the dtype of ``Q``.
        Q: ``(d, n)`` orthonormal columns (the basis and the frontier).
        L: ``(d, l)`` orthonormal columns, orthogonal to ``Q`` (the locked vectors).
        op: The counted operator, whose inner products sum over the processes when its
            vectors are shards.

    Returns:
        ``(h, g, w, norm)``: the float64 coefficients along ``Q`` ``(n,)`` and ``L`` ``(l,)`` on
        the CPU, the orthogonal remainder ``(d,)`` and its norm.
    """
    acc = Q.dtype if Q.device.type == "mps" else F64
    h = torch.zeros(Q.shape[1], dtype=acc, device=Q.device)
    g = torch.zeros(L.shape[1], dtype=acc, device=Q.device)
    norm, own = float(op.norm(w)), False
    for _ in range(3):
        for B, coef in ((Q, h), (L, g)):
            if B.shape[1]:
                c = op.dot64(B, w)  # float64 sums whatever the basis dtype
                cb = c.to(B.dtype)
                w = w.addmv_(B, cb, alpha=-1) if own else torch.addmv(w, B, cb, alpha=-1)
                own = True
                coef += c
        new = float(op.norm(w))
        if new > norm / math.sqrt(2) or new == 0.0:
            break
        norm = new
    return h.cpu().to(F64), g.cpu().to(F64), w, new


def step(runs: Sequence[Lanczos], op: Counted) -> None:
    """Advance every run by one block: all frontiers go through ``op`` as one product."""
    live = [lz for lz in runs if lz.b > 0]
    if not live:
        return
    # one run: its frontier goes as a view of the basis where the operator takes strided
    # blocks (hesse's operators and tensors), instead of a (d, b) copy held during the product
    one = len(live) == 1 and op.takes_views
    W = op(live[0].frontier if one else torch.cat([lz.frontier for lz in live], 1))
    for lz, w in zip(live, W.split([lz.b for lz in live], 1), strict=True):
        lz.absorb(w)
