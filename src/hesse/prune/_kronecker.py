r"""KFAC and EKFAC curvature for pruning: each block in its eigenbasis, exact under damping.

The Kronecker-factored OBS of LLM Surgeon (van der Ouderaa et al. 2023, "The LLM Surgeon").
Every diagonal block of a :class:`~hesse.KFACOperator` or :class:`~hesse.EKFACOperator` is
written in its eigenbasis, acting on the block's parameters seen as one matrix :math:`M`
(``rows x cols``: the weight as ``(outputs, inputs)``, see ``K.factors``):

.. math::
    C_b = (Q_L \otimes Q_R)\, \mathrm{diag}(\mathrm{vec}\, S)\, (Q_L \otimes Q_R)^\top,

with :math:`S = \lambda_L \lambda_R^\top` from the eigendecompositions of a KFAC block's two
factors, EKFAC's own scalings, or, for an exact dense block (a LayerNorm, a weight tied
between modules), its eigendecomposition with :math:`M` one column. The damping is
:math:`\lambda I` on the whole block, added to every eigenvalue, so that for
:math:`H = C + \lambda I`

.. math::
    \mathrm{diag}(H^{-1}) = (Q_L \circ Q_L)\, (S + \lambda)^{\circ -1}\, (Q_R \circ Q_R)^\top,
    \qquad H^{-1} M = Q_L \big[(Q_L^\top M Q_R) \oslash (S + \lambda)\big] Q_R^\top

exactly. (curvlinops and LLM Surgeon damp the factors instead, :math:`(G + \sqrt\lambda I)
\otimes (A + \sqrt\lambda I)`, which adds :math:`\sqrt\lambda (G \otimes I + I \otimes A)`
as well; the form here is the same :math:`C + \lambda I` as the dense ``"obs"``.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linalg import solve
from ..operators import PSD, SYMMETRIC, Operator, kronecker_operator
from ..operators.kfac import DenseBlock, EigenBlock, KronBlock
from ..problem.objective import Objective

KRONECKER = ("kfac", "ekfac")


@dataclass(frozen=True)
class Eigenform:
    r"""One diagonal block :math:`(Q_L \otimes Q_R) \mathrm{diag}(S) (Q_L \otimes Q_R)^\top`.

    Attributes:
        index: ``(rows, cols)`` positions of the block's matrix entries in the flat layout.
        QL: ``(rows, rows)`` orthogonal, or None (the identity).
        QR: ``(cols, cols)`` orthogonal, or None (the identity).
        S: ``(rows, cols)`` eigenvalues, at least 0.
        diag: ``(rows, cols)`` the block's diagonal (exact zeros where a row of it is zero).
    """

    index: torch.Tensor
    QL: torch.Tensor | None
    QR: torch.Tensor | None
    S: torch.Tensor
    diag: torch.Tensor

    def diagonal(self, scale: torch.Tensor) -> torch.Tensor:
        r"""The diagonal of :math:`(Q_L \otimes Q_R) \mathrm{diag}(\mathrm{scale}) (\dots)^\top`."""
        return _diagonal_in(self.QL, self.QR, scale)

    def product(self, M: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The same matrix times ``M`` ``(..., rows, cols)``."""
        rotated = _right(_left(self.QL, M, transpose=True), self.QR) * scale
        return _right(_left(self.QL, rotated), self.QR, transpose=True)

    def double(self) -> Eigenform:
        """The block in float64."""
        QL, QR = (None if Q is None else Q.double() for Q in (self.QL, self.QR))
        return Eigenform(self.index, QL, QR, self.S.double(), self.diag.double())


@dataclass(frozen=True)
class KroneckerCurvature:
    r"""The damped block-diagonal :math:`H = C + \lambda I` of KFAC or EKFAC, block by block.

    Attributes:
        blocks: The diagonal blocks.
        damping: :math:`\lambda`.
        dead: ``(d,)`` bool, the weights already pruned: every OBS update keeps them at zero.
    """

    blocks: tuple[Eigenform, ...]
    damping: float
    dead: torch.Tensor

    def inverse_diag(self) -> torch.Tensor:
        r""":math:`\mathrm{diag}(H^{-1})`, ``(d,)``."""
        S = self.blocks[0].S
        out = torch.empty(self.dead.shape[0], dtype=S.dtype, device=S.device)
        for b in self.blocks:
            out[b.index] = b.diagonal(1 / (b.S + self.damping))
        return out

    def obs_update(self, w: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, float]:
        r"""The joint OBS update that zeroes ``Q`` and keeps the pruned weights at zero.

        Per block, with :math:`P` the weights to hold at zero (``Q`` and those pruned
        before), :math:`\delta = -H^{-1}_{:P}\, \mu` where :math:`[H^{-1}]_{PP}\, \mu = w_P`,
        solved by conjugate gradients on products with :math:`H^{-1}` (two small matrix
        products each); predicted loss increase :math:`\frac12 w_P^\top \mu`.

        Raises:
            RuntimeError: CG (in float64) did not reach a relative residual of 1e-10.
        """
        zero = self.dead.clone()
        zero[Q] = True
        delta, predicted = torch.zeros_like(w), 0.0
        for b in self.blocks:
            P = zero[b.index]
            if P.any():
                d, p = _block_update(b, w[b.index], P, self.damping)
                delta[b.index], predicted = d, predicted + p
        return delta, predicted


def kronecker_blocks(obj: Objective, kind: str) -> tuple[Eigenform, ...]:
    """The blocks of the KFAC (``kind="kfac"``) or EKFAC operator of ``obj``, in eigenform.

    The factors are those of the GGN (``kind="exact"``, KFLR).
    """
    K = kronecker_operator(obj, kind)
    positions = obj.space.split(torch.arange(obj.dim))
    return tuple(_eigenform(b, positions, obj.dtype) for b in K.factors.values())


def _eigenform(block: KronBlock | EigenBlock | DenseBlock, positions: dict, dtype) -> Eigenform:
    if isinstance(block, DenseBlock):
        index = torch.cat([positions[n].reshape(-1) for n in block.names])[:, None]
        return _dense(index, block.matrix, block.matrix.diagonal()[:, None])
    index = block.layout.to_matrix({n: positions[n][None] for n in block.names})[0]
    if isinstance(block, EigenBlock):
        S = block.S.to(dtype)  # float64 in the operator; products run in the weights' dtype
        return Eigenform(index, block.QL, block.QR, S, _round(_diagonal_in(block.QL, block.QR, S)))
    diag = torch.as_tensor(sum(_diag(L)[:, None] * _diag(R)[None, :] for L, R in block.terms))
    if len(block.terms) > 1:  # a tied weight: a sum of Kronecker products, formed densely
        return _dense(index.reshape(-1, 1), _tied(block), diag.reshape(-1, 1))
    L, R = block.terms[0]
    (lL, QL), (lR, QR) = _eigh(L), _eigh(R)
    return Eigenform(index, QL, QR, torch.outer(lL, lR).to(L.dtype), diag)


def _dense(index: torch.Tensor, C: torch.Tensor, diag: torch.Tensor) -> Eigenform:
    values, Q = _eigh(C)
    return Eigenform(index, Q, None, values[:, None].to(C.dtype), diag)


def _tied(block: KronBlock) -> torch.Tensor:
    if block.dim > block.max_dense:
        raise ValueError(
            f"prune(curvature='kfac'): block {block.label!r} is a sum of {len(block.terms)} "
            f"Kronecker products (a weight tied between modules); its inverse needs it formed "
            f"densely, {block.dim} x {block.dim}, more than max_dense={block.max_dense}. Leave "
            "the tied weight out of params=, or use curvature='ekfac' (one eigenbasis per block)."
        )
    C = sum(torch.kron(_matrix(L), _matrix(R)) for L, R in block.terms)
    return torch.as_tensor(C)


def _eigh(F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eigenvalues (float64, clamped at 0: the factors are PSD) and vectors (``F``'s dtype).

    A 1-d factor is a diagonal: its eigenvectors are the identity (None).
    """
    if F.dim() == 1:
        return F.double().clamp_min(0), None
    values, vectors = torch.linalg.eigh(((F + F.T) / 2).double())
    return values.clamp_min(0), vectors.to(F.dtype)


def _round(diag: torch.Tensor) -> torch.Tensor:
    """A diagonal formed from an eigenbasis, its round-off (below ``n eps max``) set to 0."""
    floor = diag.numel() * torch.finfo(diag.dtype).eps * diag.abs().max()
    return torch.where(diag > floor, diag, 0.0)


def _diag(F: torch.Tensor) -> torch.Tensor:
    return F if F.dim() == 1 else F.diagonal()


def _diagonal_in(QL: torch.Tensor | None, QR: torch.Tensor | None, S: torch.Tensor):
    r"""The diagonal of :math:`(Q_L \otimes Q_R) \mathrm{diag}(S) (Q_L \otimes Q_R)^\top`."""
    return _right(_left(_squared(QL), S), _squared(QR), transpose=True)


def _matrix(F: torch.Tensor) -> torch.Tensor:
    return torch.diag(F) if F.dim() == 1 else F


def _squared(Q: torch.Tensor | None) -> torch.Tensor | None:
    return None if Q is None else Q**2


def _left(Q: torch.Tensor | None, M: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    if Q is None:
        return M
    return (Q.T if transpose else Q) @ M


def _right(M: torch.Tensor, Q: torch.Tensor | None, transpose: bool = False) -> torch.Tensor:
    if Q is None:
        return M
    return M @ (Q.T if transpose else Q)


class _InverseOnSubset(Operator):
    r""":math:`[H^{-1}]_{PP}` of one block: scatter into the block, apply :math:`H^{-1}`, gather."""

    def __init__(self, block: Eigenform, P: torch.Tensor, damping: float):
        n, dtype = int(P.sum()), block.S.dtype
        super().__init__(n, dtype, block.S.device, (SYMMETRIC, PSD))
        self.block, self.P, self.scale = block, P, 1 / (block.S + damping)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        M = V.new_zeros(V.shape[1], *self.P.shape)
        M[:, self.P] = V.T
        return self.block.product(M, self.scale)[:, self.P].T


def _block_update(block: Eigenform, W: torch.Tensor, P: torch.Tensor, damping: float):
    """One block's joint OBS update (see :meth:`KroneckerCurvature.obs_update`).

    In float64 whatever the weights' dtype: CG's attainable residual is about the condition
    number times the unit round-off, 1e-3 in float32 at the usual damping.
    """
    dtype, block, W = W.dtype, block.double(), W.double()
    op = _InverseOnSubset(block, P, damping)
    r = solve(op, W[P], tol=1e-10)
    if not r.converged:
        raise RuntimeError(
            f"prune: the OBS update of a Kronecker block ({int(P.sum())} weights zeroed) did not "
            f"converge in {r.n_matvecs} CG steps (residual {float(r.residual_norm.max()):.3g}); "
            "raise damping= (it bounds the condition number)."
        )
    mu = torch.zeros_like(W)
    mu[P] = r.value
    delta = -block.product(mu, op.scale)
    delta[P] = -W[P]  # exactly, where CG meets it to its tolerance
    return delta.to(dtype), float(0.5 * (W[P] @ r.value))
