"""The inverse of a (damped) operator whose products are solves: ``hesse.inverse``."""

from __future__ import annotations

from typing import Any

import torch

from ..operators import PSD, SYMMETRIC, DenseOperator, Operator
from ._util import as_operator, tags_of
from .solve import NotConvergedError, SolveResult, _check, _check_budget, default_tol, solve


def inverse(
    A: Any,
    damping: float = 0.0,
    *,
    method: str = "cg",
    tol: float | None = None,
    max_matvecs: int | None = None,
    allow_unconverged: bool = False,
) -> InverseOperator:
    r"""The operator :math:`x \mapsto (A + \lambda I)^{-1} x`, each product a :func:`solve`.

    ``method="cg"`` (or ``"lissa"``) needs an operator declared PSD or ``damping > 0``;
    ``"minres"`` takes any symmetric one. A product whose solve does not converge raises
    ``NotConvergedError`` unless ``allow_unconverged=True``; the ``SolveResult`` of the most
    recent product is in ``.last``. Operators with an exact inverse (``WoodburyFisher``) give
    it by their own ``.inverse(damping)``.

    Args:
        A: A symmetric ``(d, d)`` operator (an ``Operator``, a tensor, anything ``solve`` takes).
        damping: :math:`\lambda \ge 0`.
        method: ``"cg"``, ``"minres"`` or ``"lissa"``.
        tol: Relative residual tolerance of each solve (``solve``'s default if None).
        max_matvecs: Products of ``A`` allowed per column of a product, at least 2
            (``solve``'s default if None); ``inv @ V`` with ``k`` columns may spend ``k``
            times as many.
        allow_unconverged: Return unconverged solves instead of raising.

    Returns:
        An :class:`InverseOperator`.
    """
    return InverseOperator(
        A,
        damping,
        method=method,
        tol=tol,
        max_matvecs=max_matvecs,
        allow_unconverged=allow_unconverged,
    )


class InverseOperator(Operator):
    r"""The operator :math:`(A + \lambda I)^{-1}`: each product solves a system with ``solve``.

    Built by :func:`inverse`. A product
    ``inv @ V`` with ``k`` columns returns ``solve(A, V, damping=..., method=..., tol=...,
    max_matvecs=k * max_matvecs).value``, so it is exact only up to ``tol``. A solve that does
    not converge raises ``NotConvergedError`` rather than returning an inaccurate product,
    unless ``allow_unconverged=True``.

    The inverse of a symmetric operator is symmetric (``.T`` is the operator itself), and PSD
    when ``A`` is declared PSD. ``n_matvecs`` counts products with the inverse; the products
    with ``A`` they cost are in ``op.n_matvecs`` (and ``last.n_matvecs``).

    Args:
        op: The symmetric operator ``A`` (an ``Operator`` or anything ``solve`` takes).
        damping: :math:`\lambda \ge 0`.
        method: ``"cg"`` and ``"lissa"`` need ``A`` declared PSD or ``damping > 0``;
            ``"minres"`` takes any symmetric ``A`` (a Hessian away from a minimum).
        tol: Relative residual tolerance of each solve (default: ``solve``'s).
        max_matvecs: Products of ``A`` allowed per column (right-hand side) of a product, at
            least 2; a product with ``k`` columns may spend ``k * max_matvecs``, shared by
            its columns (CG stops multiplying a column once it converges). Default:
            ``solve``'s.
        allow_unconverged: Return unconverged solves (check ``last.converged``) instead of
            raising.

    Attributes:
        last: The ``SolveResult`` of the most recent product (None before the first): its
            diagnostics, since ``inv @ V`` returns a tensor. Each product replaces it; an
            algorithm that multiplies many times (``eigs(inv)``) leaves the last one's there,
            and every earlier one converged unless ``allow_unconverged=True``.

    Raises:
        ValueError: at construction, as ``solve`` would (a method the structure does not allow,
            negative damping, a non-symmetric operator, ``max_matvecs < 2``).

    Example:
        >>> from hesse.operators import DenseOperator
        >>> A = DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)))
        >>> inv = inverse(A, damping=1.0)
        >>> inv @ torch.tensor([2.0, 3.0, 5.0], dtype=torch.float64)
        tensor([1., 1., 1.], dtype=torch.float64)
        >>> inv.last.converged, inv.T is inv
        (True, True)
    """

    def __init__(
        self,
        op: Any,
        damping: float = 0.0,
        *,
        method: str = "cg",
        tol: float | None = None,
        max_matvecs: int | None = None,
        allow_unconverged: bool = False,
    ):
        # wrapped once: a raw matrix's structure (an eigvalsh) would be inferred on every product
        A = as_operator(op)
        A = DenseOperator(A) if isinstance(A, torch.Tensor) else A
        _check(A, method, damping, "inverse")
        if max_matvecs is not None:
            _check_budget(max_matvecs, 2, "inverse", " per column")
        tags = (SYMMETRIC, PSD) if PSD in tags_of(A) else (SYMMETRIC,)
        space = op.space if isinstance(op, Operator) else None
        super().__init__(A.shape[0], A.dtype, A.device, tags, space)
        self.op = A
        self.damping, self.method = float(damping), method
        self.tol = tol if tol is not None else default_tol(A.dtype)
        self.max_matvecs, self.allow_unconverged = max_matvecs, allow_unconverged
        self.last: SolveResult | None = None

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        k = V.shape[1]
        budget = None if self.max_matvecs is None else self.max_matvecs * k
        r = solve(
            self.op, V, damping=self.damping, method=self.method, tol=self.tol, max_matvecs=budget
        )
        self.last = r
        if not r.converged and not self.allow_unconverged:
            rel = r.residual_norm / torch.linalg.vector_norm(V.double(), dim=0).cpu().clamp_min(
                1e-300
            )
            raise NotConvergedError(
                f"InverseOperator: solve(method={self.method!r}, damping={self.damping}) did not "
                f"converge: relative residual {float(rel.max()):.2e} > tol {self.tol:.1e} after "
                f"{r.n_matvecs} products for {k} column(s). Pass a larger max_matvecs (now "
                f"{self.max_matvecs} per column), more damping, or allow_unconverged=True to "
                "accept it; the SolveResult is in .last (and in this error's .result).",
                r,
            )
        return r.value

    def _restrict(self, names: list[str]) -> Operator:
        raise NotImplementedError(
            "InverseOperator: a diagonal block of an inverse is not the inverse of the block; "
            "restrict first, then invert: hesse.inverse(A.restrict(names), ...)."
        )
