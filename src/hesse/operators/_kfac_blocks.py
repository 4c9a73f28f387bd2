r"""The diagonal blocks of the Kronecker-factored operators: products, traces, spectra, inverses.

A factored block acts on its parameters seen as one matrix :math:`M` (``rows x cols``: the
weight as ``(outputs, inputs)`` rows, the bias as a last column). A Kronecker term
:math:`L \otimes R` maps :math:`\mathrm{vec}(M)` (row-major) to :math:`\mathrm{vec}(L M R)`
for symmetric :math:`R`, so a product never forms the block. A factor is a matrix, or a 1-d
tensor holding a diagonal (the token counts of an embedding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Parts = dict[str, torch.Tensor]  # name -> (k, *shape)


class Layout:
    """Where a group's parameters sit in the matrix ``M`` (``rows x cols``) its factors act on.

    Args:
        names: The parameters, in the order of the operator's layout.
        shapes: Their shapes.
        weight: The weight's name, or None.
        axis: The weight's output axis (``hesse.problem._weights.output_axis``).
        bias: The bias's name (the last column), or None.
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[torch.Size], weight, axis, bias):
        self.names, self.shapes = list(names), dict(zip(names, shapes, strict=True))
        self.weight, self.axis, self.bias = weight, axis, bias
        if weight is not None:
            self.rows = self.shapes[weight][axis]
            self.weight_cols = self.shapes[weight].numel() // self.rows
        else:
            self.rows, self.weight_cols = self.shapes[bias].numel(), 0
        self.cols = self.weight_cols + (bias is not None)

    def to_matrix(self, parts: Parts) -> torch.Tensor:
        """The ``(k, rows, cols)`` matrices of ``k`` stacked tangents."""
        pieces = []
        if self.weight is not None:
            W = parts[self.weight]
            pieces.append(W.movedim(self.axis + 1, 1).reshape(W.shape[0], self.rows, -1))
        if self.bias is not None:
            b = parts[self.bias]
            pieces.append(b.reshape(b.shape[0], self.rows, 1))
        return torch.cat(pieces, 2) if len(pieces) > 1 else pieces[0]

    def from_matrix(self, M: torch.Tensor) -> Parts:
        """Inverse of :meth:`to_matrix`."""
        out, k = {}, M.shape[0]
        if self.weight is not None:
            shape, a = self.shapes[self.weight], self.axis
            moved = (shape[a], *shape[:a], *shape[a + 1 :])
            W = M[:, :, : self.weight_cols].reshape(k, *moved)
            out[self.weight] = W.movedim(1, a + 1)
        if self.bias is not None:
            out[self.bias] = M[:, :, -1].reshape(k, *self.shapes[self.bias])
        return out

    def restrict(self, names: Sequence[str]) -> tuple[Layout, torch.Tensor]:
        """The layout of a subset of the parameters, and the columns of ``M`` it keeps."""
        weight = self.weight if self.weight in names else None
        bias = self.bias if self.bias in names else None
        keep = list(range(self.weight_cols)) if weight is not None else []
        keep += [self.cols - 1] if bias is not None else []
        sub = Layout(names, [self.shapes[n] for n in names], weight, self.axis, bias)
        return sub, torch.tensor(keep, dtype=torch.long)


def eigh(F: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eigenvalues (float64) and eigenvectors (``F``'s dtype; None for a diagonal) of a PSD ``F``.

    Eigenvalues within ``F``'s round-off of 0 (below ``n * eps * max``, negative ones included)
    are 0: a rank-deficient factor stays exactly singular.

    Raises:
        ValueError: ``F`` has non-finite entries (the message names ``what``).
    """
    if not torch.isfinite(F).all():
        raise ValueError(
            f"{what} has non-finite entries (inf or nan), so it has no eigendecomposition; check "
            "the inputs and targets and the numerical range of the loss (float32 overflow)."
        )
    if F.dim() == 1:
        return F.double().clamp_min(0), None
    values, vectors = torch.linalg.eigh(F.double())
    floor = F.shape[0] * torch.finfo(F.dtype).eps * values.abs().max()
    return torch.where(values > floor, values, 0.0), vectors.to(F.dtype)


def left(L: torch.Tensor | None, M: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``L M`` (``L^T M`` with ``transpose``) for ``M`` (k, rows, cols); None is the identity."""
    if L is None:
        return M
    if L.dim() == 1:
        return L[:, None] * M
    return (L.T if transpose else L) @ M


def right(M: torch.Tensor, R: torch.Tensor | None, transpose: bool = False) -> torch.Tensor:
    """``M R`` (``M R^T`` with ``transpose``); None is the identity."""
    if R is None:
        return M
    if R.dim() == 1:
        return M * R
    return M @ (R.T if transpose else R)


def inverse_scale(values: torch.Tensor, damping: float, label: str) -> torch.Tensor:
    """``1 / (values + damping)``, refusing a block that is singular to working precision.

    Raises:
        ValueError: the smallest ``values + damping`` is at most ``1e-12`` times the largest.
    """
    shifted = values + damping
    if shifted.numel() and shifted.min() <= 1e-12 * shifted.max():
        raise ValueError(
            f"inverse: block {label!r} is singular to working precision (eigenvalues from "
            f"{float(values.min()):.3g} to {float(values.max()):.3g}); pass damping > 0, e.g. "
            f"1e-3 times its mean eigenvalue {float(values.mean()):.3g}."
        )
    return 1.0 / shifted


def _as_matrix(F: torch.Tensor) -> torch.Tensor:
    return torch.diag(F) if F.dim() == 1 else F


def _total(tensors: list[torch.Tensor]) -> torch.Tensor:
    out = tensors[0]
    for t in tensors[1:]:
        out = out + t
    return out


def _trace(F: torch.Tensor) -> float:
    return float(F.sum() if F.dim() == 1 else F.diagonal().sum())


class KronBlock:
    r"""A sum of Kronecker terms :math:`\sum_t L_t \otimes R_t` on a group's matrix :math:`M`.

    One term (a module's weight and bias) has its spectrum and inverse from the factors'
    eigendecompositions. Several terms (a weight tied between modules) are summed as dense
    matrices for the spectrum and the inverse, when the block has at most ``max_dense`` entries.

    Args:
        layout: The group's matrix layout.
        terms: ``(L, R)`` pairs: ``L`` ``(rows, rows)`` or ``(rows,)``, ``R`` ``(cols, cols)``
            or ``(cols,)``, symmetric PSD.
        label: The group's modules (for messages).
        max_dense: Largest block formed densely (several terms only).
    """

    def __init__(self, layout: Layout, terms: list, label: str, max_dense: int):
        self.layout, self.terms, self.label, self.max_dense = layout, terms, label, max_dense
        self.names, self.dim = layout.names, layout.rows * layout.cols
        self._eig = None

    def apply(self, parts: Parts) -> Parts:
        M = self.layout.to_matrix(parts)
        return self.layout.from_matrix(_total([left(L, right(M, R)) for L, R in self.terms]))

    def trace(self) -> float:
        return sum(_trace(L) * _trace(R) for L, R in self.terms)

    def eigenvalues(self) -> torch.Tensor:
        return self._eigen()[0]

    def solve(self, parts: Parts, damping: float) -> Parts:
        values, vectors = self._eigen()
        scale = inverse_scale(values, damping, self.label)
        M = self.layout.to_matrix(parts)
        if len(self.terms) == 1:
            (QL, QR), shape = vectors, (self.layout.rows, self.layout.cols)
            rotated = right(left(QL, M, transpose=True), QR)
            scaled = rotated * scale.reshape(shape).to(M.dtype)
            return self.layout.from_matrix(right(left(QL, scaled), QR, transpose=True))
        flat = M.reshape(M.shape[0], -1)
        out = ((flat @ vectors) * scale.to(M.dtype)) @ vectors.T
        return self.layout.from_matrix(out.reshape(M.shape))

    def restrict(self, names: Sequence[str]) -> KronBlock:
        if list(names) == self.names:
            return self
        layout, keep = self.layout.restrict(names)
        terms = [(L, R[keep] if R.dim() == 1 else R[keep][:, keep]) for L, R in self.terms]
        return KronBlock(layout, terms, self.label, self.max_dense)

    def _eigen(self):
        """``(eigenvalues, vectors)``: ``(Q_L, Q_R)`` for one term, the dense ``Q`` for several."""
        if self._eig is None:
            self._eig = self._one_term() if len(self.terms) == 1 else self._dense()
        return self._eig

    def _one_term(self):
        L, R = self.terms[0]
        lL, QL = eigh(L, f"the row factor of block {self.label!r}")
        lR, QR = eigh(R, f"the column factor of block {self.label!r}")
        return torch.outer(lL, lR).reshape(-1), (QL, QR)

    def _dense(self):
        if self.dim > self.max_dense:
            raise ValueError(
                f"block {self.label!r} is a sum of {len(self.terms)} Kronecker products (a "
                f"weight tied between modules), whose spectrum and inverse have no closed form; "
                f"forming it densely takes a {self.dim} x {self.dim} matrix, more than "
                f"max_dense={self.max_dense}. Raise max_dense, leave the tied weight out of the "
                "Objective (params=...), or use EKFACOperator (one eigenbasis per block), or "
                "hesse.inverse(K, damping) (iterative)."
            )
        dense = _total([torch.kron(_as_matrix(L), _as_matrix(R)) for L, R in self.terms])
        return eigh((dense + dense.T) / 2, f"block {self.label!r}")


class EigenBlock:
    r"""EKFAC's block :math:`(Q_L \otimes Q_R)\, \mathrm{diag}(S)\, (Q_L \otimes Q_R)^\top`.

    Args:
        layout: The group's matrix layout.
        QL: ``(rows, rows)`` orthogonal, or None (the identity).
        QR: ``(cols, cols)`` orthogonal, or None.
        S: ``(rows, cols)`` float64 scalings, the eigenvalues.
        label: The group's modules (for messages).
    """

    def __init__(self, layout: Layout, QL, QR, S: torch.Tensor, label: str):
        self.layout, self.QL, self.QR, self.S, self.label = layout, QL, QR, S, label
        self.names, self.dim = layout.names, S.numel()

    def apply(self, parts: Parts) -> Parts:
        return self._scaled(parts, self.S)

    def trace(self) -> float:
        return float(self.S.sum())

    def eigenvalues(self) -> torch.Tensor:
        return self.S.reshape(-1)

    def solve(self, parts: Parts, damping: float) -> Parts:
        return self._scaled(parts, inverse_scale(self.S, damping, self.label))

    def diagonal(self) -> Parts:
        """The block's diagonal, as ``(1, *shape)`` tensors per parameter."""
        square = [None if Q is None else Q.double() ** 2 for Q in (self.QL, self.QR)]
        D = right(left(square[0], self.S[None]), square[1], transpose=True)
        return self.layout.from_matrix(D)

    def restrict(self, names: Sequence[str]):
        return self if list(names) == self.names else ProjectedBlock(self, names)

    def _scaled(self, parts: Parts, scale: torch.Tensor) -> Parts:
        M = self.layout.to_matrix(parts)
        rotated = right(left(self.QL, M, transpose=True), self.QR) * scale.to(M.dtype)
        return self.layout.from_matrix(right(left(self.QL, rotated), self.QR, transpose=True))


class ProjectedBlock:
    """A part of an :class:`EigenBlock` (a weight without its bias): products and trace only."""

    def __init__(self, block: EigenBlock, names: Sequence[str]):
        self.block, self.names, self.label = block, list(names), block.label
        self.dim = sum(block.layout.shapes[n].numel() for n in self.names)

    def apply(self, parts: Parts) -> Parts:
        k = next(iter(parts.values())).shape[0]
        shapes = self.block.layout.shapes
        full = {n: parts.get(n, parts[self.names[0]].new_zeros(k, *shapes[n])) for n in shapes}
        out = self.block.apply(full)
        return {n: out[n] for n in self.names}

    def trace(self) -> float:
        diagonal = self.block.diagonal()
        return float(sum(diagonal[n].sum() for n in self.names))

    def eigenvalues(self) -> torch.Tensor:
        raise self._no_basis()

    def solve(self, parts: Parts, damping: float) -> Parts:
        raise self._no_basis()

    def restrict(self, names: Sequence[str]):
        return ProjectedBlock(self.block, names)

    def _no_basis(self) -> ValueError:
        return ValueError(
            f"EKFACOperator: the restriction of block {self.label!r} to {self.names} cuts its "
            "Kronecker eigenbasis (the weight and bias share it), so it has no closed-form "
            "spectrum or inverse; restrict to whole modules."
        )


class DenseBlock:
    """The exact block of parameters that no Kronecker factor covers, as a dense matrix.

    Args:
        names: The parameters, in the operator's layout order.
        shapes: Their shapes.
        matrix: ``(d_g, d_g)`` symmetric, in the flat layout of ``names``.
        label: The modules (for messages).
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[torch.Size], matrix, label: str):
        self.names, self.shapes = list(names), list(shapes)
        self.matrix, self.label, self.dim = matrix, label, matrix.shape[0]
        self._eig = None

    def apply(self, parts: Parts) -> Parts:
        k = parts[self.names[0]].shape[0]
        flat = torch.cat([parts[n].reshape(k, -1) for n in self.names], 1)
        return self._split(flat @ self.matrix.to(flat.dtype))

    def trace(self) -> float:
        return float(self.matrix.trace())

    def eigenvalues(self) -> torch.Tensor:
        return self._eigen()[0]

    def solve(self, parts: Parts, damping: float) -> Parts:
        values, Q = self._eigen()
        scale = inverse_scale(values, damping, self.label)
        k = parts[self.names[0]].shape[0]
        flat = torch.cat([parts[n].reshape(k, -1) for n in self.names], 1)
        return self._split(((flat @ Q) * scale.to(flat.dtype)) @ Q.T)

    def restrict(self, names: Sequence[str]) -> DenseBlock:
        if list(names) == self.names:
            return self
        starts, start = {}, 0
        for n, s in zip(self.names, self.shapes, strict=True):
            starts[n], start = range(start, start + s.numel()), start + s.numel()
        idx = torch.tensor([i for n in names for i in starts[n]], dtype=torch.long)
        shapes = [self.shapes[self.names.index(n)] for n in names]
        return DenseBlock(names, shapes, self.matrix[idx][:, idx], self.label)

    def _eigen(self):
        if self._eig is None:
            self._eig = eigh(self.matrix, f"the exact block of {self.label!r}")
        return self._eig

    def _split(self, flat: torch.Tensor) -> Parts:
        sizes = [s.numel() for s in self.shapes]
        pieces = torch.split(flat, sizes, dim=1)
        k = flat.shape[0]
        return {
            n: p.reshape(k, *s) for n, p, s in zip(self.names, pieces, self.shapes, strict=True)
        }


def eigenbasis(terms: list, label: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    r"""EKFAC's Kronecker eigenbasis ``(Q_L, Q_R)`` of a group's terms (None: the identity).

    One term: the eigenvectors of its factors. Several (a tied weight): those of the sum of
    the uses' factors, each scaled to unit trace, so that no use's units dominate; EKFAC's
    scalings are then the exact diagonal in that basis.
    """
    rows = _basis([L for L, _ in terms], f"the row factor of block {label!r}")
    return rows, _basis([R for _, R in terms], f"the column factor of block {label!r}")


def _basis(factors: list[torch.Tensor], what: str) -> torch.Tensor | None:
    if len(factors) == 1:
        return eigh(factors[0], what)[1]
    traces = [_trace(F) for F in factors]
    scaled = [F / t if t > 0 else F for F, t in zip(factors, traces, strict=True)]
    if all(F.dim() == 1 for F in scaled):
        return eigh(_total(scaled), what)[1]
    return eigh(_total([_as_matrix(F) for F in scaled]), what)[1]
