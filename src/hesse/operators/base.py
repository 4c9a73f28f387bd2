"""Linear operators: the base class that gives every curvature matrix the same interface."""

from __future__ import annotations

import copy
import functools
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast, overload

import numpy as np
import torch

from ..problem.params import ParamSpace

SYMMETRIC, PSD = "symmetric", "psd"


class Operator:
    """A square linear operator ``A`` of shape ``(d, d)`` seen through products ``A @ V``.

    Subclasses implement ``_matmat(V)`` for ``V`` of shape ``(d, k)``; this class gives
    ``@``, ``matvec``, ``matmat``, sums, scaling by a scalar (a number, a numpy scalar or a 0-d
    tensor) and division by one, products ``A @ B`` of operators, the transpose ``.T``,
    damping, restriction to parameter blocks, product counting
    (``n_matvecs`` counts columns) and conversion to SciPy and dense.

    Attributes:
        shape: ``(d, d)``.
        dtype: Floating dtype of the products.
        device: Device of the products.
        tags: Declared structure: ``"symmetric"``, ``"psd"`` (positive semi-definite).
        space: The parameter layout of the rows, or None for an unstructured operator.
        n_matvecs: Matrix-vector products computed so far (a ``(d, k)`` product counts ``k``).
    """

    __array_ufunc__ = None  # numpy scalars defer to Operator.__rmul__ instead of broadcasting

    def __init__(
        self,
        dim: int,
        dtype: torch.dtype,
        device: torch.device,
        tags: Iterable[str] = (),
        space: ParamSpace | None = None,
    ):
        self.shape = (dim, dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.tags = frozenset(tags)
        self.space = space
        self.n_matvecs = 0
        self._transpose_of: Operator | None = None  # set on the operator that .T returns

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A @ V`` for ``V`` of shape ``(d, k)``, in one pass over the data."""
        d = self.shape[0]
        if V.dim() != 2 or V.shape[0] != d:
            raise ValueError(
                f"{type(self).__name__}: expected shape ({d}, k), got {tuple(V.shape)}."
            )
        self.n_matvecs += V.shape[1]
        return self._matmat(V.to(device=self.device, dtype=self.dtype))

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A @ v`` for ``v`` of shape ``(d,)``."""
        if v.dim() != 1:
            raise ValueError(
                f"{type(self).__name__}.matvec: expected shape (d,), got {tuple(v.shape)}."
            )
        return self.matmat(v[:, None])[:, 0]

    @overload
    def __matmul__(self, x: torch.Tensor) -> torch.Tensor: ...
    @overload
    def __matmul__(self, x: Operator) -> Operator: ...
    def __matmul__(self, x: torch.Tensor | Operator) -> torch.Tensor | Operator:
        if isinstance(x, Operator):
            return ProductOperator([self, x])
        return self.matvec(x) if x.dim() == 1 else self.matmat(x)

    def __add__(self, other: Operator) -> Operator:
        if _is_zero(other):
            return self
        if not isinstance(other, Operator):
            return NotImplemented
        return SumOperator([self, other])

    def __radd__(self, other: Any) -> Operator:
        # 0 + A is A, so that sum(operators) works (sum starts from the integer 0).
        return self if _is_zero(other) else NotImplemented

    def __sub__(self, other: Operator) -> Operator:
        if not isinstance(other, Operator):
            return NotImplemented
        return SumOperator([self, ScaledOperator(other, -1.0)])

    def __mul__(self, c: Any) -> Operator:
        c = _scalar(c)
        return NotImplemented if c is None else ScaledOperator(self, c)

    __rmul__ = __mul__

    def __truediv__(self, c: Any) -> Operator:
        c = _scalar(c)
        if c is None:
            return NotImplemented
        if c == 0:
            raise ZeroDivisionError(f"{type(self).__name__} / 0: the scalar is zero.")
        return ScaledOperator(self, 1.0 / c)

    def __neg__(self) -> Operator:
        return ScaledOperator(self, -1.0)

    @property
    def T(self) -> Operator:  # noqa: N802 (the name of the transpose in torch and numpy)
        r"""The transpose: the operator itself when it is declared symmetric.

        Sums, scalings and products of operators with a transpose have one
        (:math:`(AB)^\top = B^\top A^\top`); a ``DenseOperator`` transposes its matrix.

        Raises:
            ValueError: the operator is not declared symmetric and its transpose is unknown.
        """
        if SYMMETRIC in self.tags:
            return self
        transpose = self._transpose()
        transpose._transpose_of = self  # lets A @ A.T be recognised as a Gram matrix
        return transpose

    def _transpose(self) -> Operator:
        raise ValueError(
            f"{type(self).__name__}.T: the operator is not declared symmetric and has no known "
            "transpose. Declare tags=('symmetric',) if it is symmetric, or build it from "
            "operators that have one (symmetric ones, DenseOperator, their sums and products)."
        )

    def inverse(self, damping: float = 0.0, **options: Any) -> Operator:
        """An exact inverse, where the operator has one (``WoodburyFisher``, Kronecker factors).

        A curvature operator seen only through products has none: ``hesse.inverse(A, damping)``
        builds the iterative one (each product a CG, MINRES or LiSSA solve).

        Raises:
            NotImplementedError: always here; operators with an exact inverse override it.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no exact inverse; hesse.inverse(op, damping=...) builds "
            "one whose products are solves (method='cg', 'minres' or 'lissa')."
        )

    def damped(self, lam: float) -> Operator:
        """``A + lam * I`` (Tikhonov damping)."""
        identity = IdentityOperator(
            self.shape[0], dtype=self.dtype, device=self.device, space=self.space
        )
        return self + float(lam) * identity

    def restrict(self, names: Sequence[str]) -> Operator:
        """The diagonal block of the named parameters (or module prefixes): ``P^T A P``."""
        return self._restrict(self._layout().select(names))

    def _layout(self) -> ParamSpace:
        """``space``, which ``restrict`` (and so ``_restrict``) needs."""
        if self.space is None:
            raise ValueError(
                f"{type(self).__name__}.restrict: this operator has no parameter names; "
                "pass space=ParamSpace(...) when building it."
            )
        return self.space

    def _restrict(self, names: list[str]) -> Operator:
        raise NotImplementedError(f"{type(self).__name__} cannot be restricted to a block.")

    def blocks(
        self, by: str = "param", groups: Mapping[str, str | Sequence[str]] | None = None
    ) -> dict[str, Operator]:
        """Diagonal blocks, as :meth:`ParamSpace.blocks` groups the parameters.

        Args:
            by: ``"param"`` (one block per parameter), ``"module"`` (per module) or ``"block"``
                (attention and MLP of each transformer layer).
            groups: User groups ``{name: names, prefixes or globs}`` instead of ``by``.
        """
        if self.space is None:
            raise ValueError(f"{type(self).__name__}.blocks: this operator has no parameter names.")
        blocks = self.space.blocks(by, groups)
        return {name: self._restrict(names) for name, names in blocks.items()}

    def to_dense(self, block_size: int = 256) -> torch.Tensor:
        """The ``(d, d)`` matrix, built from products with identity columns (``d`` matvecs).

        For an operator on local shards of parameters split across processes (FSDP), this
        process's rows of the full matrix: ``(d_local, D)``, from the ``D`` global columns.
        """
        shard = None if self.space is None else self.space.shard
        d = self.shape[0] if shard is None else shard.dim
        eye = torch.eye(d, dtype=self.dtype, device=self.device)
        eye = eye if shard is None else shard.local(eye)
        return torch.cat([self @ eye[:, i : i + block_size] for i in range(0, d, block_size)], 1)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` in float64 numpy (products go through torch)."""
        from scipy.sparse.linalg import LinearOperator

        def mm(X: np.ndarray) -> np.ndarray:
            V = torch.as_tensor(np.asarray(X, dtype=np.float64))
            out = self @ (V if V.dim() == 2 else V.reshape(-1))
            return out.detach().to("cpu", torch.float64).numpy()

        rmm = mm if SYMMETRIC in self.tags else None
        return LinearOperator(
            self.shape, matvec=mm, matmat=mm, rmatvec=rmm, rmatmat=rmm, dtype=np.float64
        )

    def __repr__(self) -> str:
        tags = ", ".join(sorted(self.tags))
        return f"{type(self).__name__}(d={self.shape[0]}, dtype={self.dtype}, tags={{{tags}}})"


class IdentityOperator(Operator):
    """The identity ``I`` of size ``d``."""

    def __init__(self, dim: int, *, dtype=torch.float64, device="cpu", space=None):
        super().__init__(dim, dtype, device, (SYMMETRIC, PSD), space)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return V.clone()

    def _restrict(self, names: list[str]) -> Operator:
        sub = self._layout().subspace(names)
        return IdentityOperator(sub.dim, dtype=self.dtype, device=self.device, space=sub)


class ScaledOperator(Operator):
    """``c * A``; stays PSD for ``c >= 0``."""

    def __init__(self, op: Operator, c: float):
        c = float(c)
        if not math.isfinite(c):
            raise ValueError(f"ScaledOperator: the scale must be finite, got {c}.")
        tags = set(op.tags) if c >= 0 else set(op.tags) - {PSD}
        super().__init__(op.shape[0], op.dtype, op.device, tags, op.space)
        self.op, self.c = op, c

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.c * self.op.matmat(V)

    def _restrict(self, names: list[str]) -> Operator:
        return ScaledOperator(self.op._restrict(names), self.c)

    def _transpose(self) -> Operator:
        return ScaledOperator(self.op.T, self.c)


class SumOperator(Operator):
    """``A_1 + ... + A_n``: symmetric (PSD) when every term is.

    The terms that have a parameter layout (``space``) must have the same one, which the sum
    takes; a sum can be restricted to a block only when every term has it. The products are in
    the dtype that ``torch.promote_types`` gives for the terms' dtypes.
    """

    def __init__(self, ops: Sequence[Operator]):
        dim, space = _common(ops, "SumOperator")
        tags = frozenset.intersection(*(op.tags for op in ops))
        dtype = functools.reduce(torch.promote_types, (op.dtype for op in ops))
        super().__init__(dim, dtype, ops[0].device, tags, space)
        self.ops = list(ops)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, sum(op.matmat(V) for op in self.ops))  # ops is never empty

    def _restrict(self, names: list[str]) -> Operator:
        for i, op in enumerate(self.ops):
            if op.space is None:
                raise ValueError(
                    f"SumOperator.restrict: term {i} of the sum ({op!r}) has no parameter layout "
                    "(space), so its block is unknown. Build that term with the same space as "
                    "the others (e.g. IdentityOperator(d, space=...), DenseOperator(M, "
                    "space=...)), or use A.damped(lam) for damping."
                )
        return SumOperator([op._restrict(names) for op in self.ops])

    def _transpose(self) -> Operator:
        return SumOperator([op.T for op in self.ops])


class ProductOperator(Operator):
    """``A_1 A_2 ... A_n``, applied right to left; built by ``A @ B`` of two operators.

    A product of symmetric matrices is not symmetric in general, so it carries no tags, except
    ``A @ A`` for one symmetric ``A`` (the same object) and ``A @ A.T`` or ``A.T @ A`` (``A.T``
    taken of that same object), which are symmetric and PSD. Its transpose is
    ``A_n^T ... A_1^T`` when every factor has one. Each factor counts its own products; the
    product counts its own applications. The factors that have a parameter layout must have
    the same one.
    """

    def __init__(self, ops: Sequence[Operator]):
        dim, space = _common(ops, "ProductOperator")
        tags = (SYMMETRIC, PSD) if _is_gram(ops) else ()
        # the last factor applied, ops[0], sets the dtype of the result
        super().__init__(dim, ops[0].dtype, ops[0].device, tags, space)
        self.ops = list(ops)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        for op in reversed(self.ops):
            V = op.matmat(V)
        return V

    def _restrict(self, names: list[str]) -> Operator:
        raise NotImplementedError(
            "ProductOperator: a diagonal block of a product is not the product of the blocks; "
            "restrict the factors first, then multiply them."
        )

    def _transpose(self) -> Operator:
        return ProductOperator([op.T for op in reversed(self.ops)])


def _is_gram(ops: Sequence[Operator]) -> bool:
    """``A @ A`` for one symmetric ``A``, ``A @ A.T`` or ``A.T @ A``: symmetric PSD."""
    if len(ops) != 2:
        return False
    a, b = ops
    return (a is b and SYMMETRIC in a.tags) or b._transpose_of is a or a._transpose_of is b


def _common(ops: Sequence[Operator], who: str) -> tuple[int, ParamSpace | None]:
    """Size and shared parameter layout of the terms or factors ``ops``.

    Raises:
        ValueError: the shapes differ, or two operators have different layouts.
    """
    first = ops[0]
    for op in ops[1:]:
        if op.shape != first.shape:
            raise ValueError(
                f"{who}: shapes {first.shape} and {op.shape} differ; the operators must be "
                "square and of the same size."
            )
    spaced = [(i, op.space) for i, op in enumerate(ops) if op.space is not None]
    for i, space in spaced[1:]:
        j, ref = spaced[0]
        if not _same_layout(space, ref):
            raise ValueError(
                f"{who}: operators {j} and {i} have different parameter layouts (space): "
                f"{_brief(ref)} and {_brief(space)}. Combine operators of the same "
                "parameters, built from the same Objective or ParamSpace."
            )
    return first.shape[0], spaced[0][1] if spaced else None


def _same_layout(a: ParamSpace, b: ParamSpace) -> bool:
    """The same names and shapes, in the same order (the same flat layout)."""
    return a is b or (a.names == b.names and a.shapes == b.shapes)


def _brief(space: ParamSpace) -> str:
    names = ", ".join(space.names[:3]) + (", ..." if len(space.names) > 3 else "")
    return f"[{names}] ({space.dim} entries)"


def _is_zero(c: Any) -> bool:
    """``c`` is the scalar 0 (``sum(operators)`` starts from it)."""
    value = _scalar(c)
    return value is not None and value == 0


def _scalar(c: Any) -> float | None:
    """``c`` as a float if it is a real number, a numpy scalar or a 0-d real tensor; else None."""
    if isinstance(c, (torch.Tensor, np.ndarray)):
        if c.ndim != 0:
            return None
        c = c.item()
    return float(c) if isinstance(c, numbers.Real) and not isinstance(c, bool) else None


def copy_with(op: Operator, **changes) -> Operator:
    """A shallow copy of ``op`` with some attributes replaced and its own product counter."""
    new = copy.copy(op)
    new.__dict__.update(changes)
    new.n_matvecs = 0
    return new
