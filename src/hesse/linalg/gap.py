"""How far an approximate curvature (KFAC, EKFAC, ...) is from the exact one, by products."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..operators import DenseOperator, GGNOperator, Operator
from ..problem.objective import Objective
from .eigs import eigs
from .frobenius import FrobeniusResult, frobenius_norm
from .trace import TraceResult, trace


@dataclass(frozen=True)
class BlockGap:
    r"""The gap :math:`D = G - K` on one diagonal block (or on the whole matrix).

    Attributes:
        dim: The block's size.
        trace: Estimate of :math:`\mathrm{tr}(D)` with its standard error and interval.
        frobenius: Estimate of :math:`\|D\|_F` with its interval.
        exact_frobenius: Estimate of :math:`\|G\|_F` with its interval.
        relative_frobenius: ``frobenius.value / exact_frobenius.value`` (inf when the latter
            is 0).
    """

    dim: int
    trace: TraceResult
    frobenius: FrobeniusResult
    exact_frobenius: FrobeniusResult
    relative_frobenius: float


@dataclass(frozen=True)
class CurvatureGap:
    r"""An approximation :math:`K` of a curvature :math:`G`, measured against it.

    Attributes:
        k: Eigenpairs compared.
        exact_eigenvalues: ``(k,)`` float64, the largest of :math:`G`, descending.
        approx_eigenvalues: ``(k,)`` float64, the largest of :math:`K`, descending.
        eigenvalue_errors: ``(k,)`` relative errors :math:`|\lambda_i(K) - \lambda_i(G)| /
            |\lambda_i(G)|` (inf where :math:`\lambda_i(G) = 0`).
        principal_angles: ``(k,)`` float64 angles in radians, ascending, between the spans of
            the top-k eigenvectors (0: the same subspace, :math:`\pi/2`: orthogonal).
        whole: The gap on the whole matrix (trace, Frobenius norms).
        blocks: The gap on each diagonal block (by module, or as asked).
        converged: Whether both eigensolves converged.
        n_matvecs: Products with :math:`G` spent (each one data pass for a ``GGNOperator``).
        reason: Why ``converged`` is False (``""`` when True).
    """

    k: int
    exact_eigenvalues: torch.Tensor
    approx_eigenvalues: torch.Tensor
    eigenvalue_errors: torch.Tensor
    principal_angles: torch.Tensor
    whole: BlockGap
    blocks: dict[str, BlockGap]
    converged: bool
    n_matvecs: int
    reason: str = ""


def curvature_gap(
    exact: Objective | Operator,
    approx: Operator | torch.Tensor,
    k: int = 10,
    *,
    by: str | None = "module",
    groups: Mapping[str, str | Sequence[str]] | None = None,
    budget: int = 30,
    method: str = "hutch++",
    seed: int = 0,
    tol: float | None = None,
    max_matvecs: int | None = None,
    progress: bool = False,
) -> CurvatureGap:
    r"""Measure an approximate curvature :math:`K` against the exact :math:`G` with products.

    The top-k spectra are compared by Lanczos (``hesse.eigs``, on each operator): the relative
    error of each eigenvalue and the principal angles between the eigenspaces,
    :math:`\theta_i = \arccos \sigma_i(U_G^\top U_K)`. The difference :math:`D = G - K` is
    measured on the whole matrix and on each diagonal block (``K.blocks(by, groups)``):
    :math:`\mathrm{tr}(D)` (``hesse.trace``) and :math:`\|D\|_F` against :math:`\|G\|_F`
    (``hesse.frobenius_norm``), each with ``budget`` products, a standard error and a 95%
    interval. A block-diagonal :math:`K` such as KFAC leaves out every off-diagonal block of
    :math:`G`, which the whole-matrix numbers include and the block numbers do not.

    Args:
        exact: An :class:`~hesse.Objective` (its :class:`~hesse.GGNOperator` is used) or the
            exact operator itself (e.g. a ``FisherOperator`` to measure an empirical KFAC).
        approx: The approximation, an operator of the same parameters (or a dense tensor).
        k: Eigenpairs to compare.
        by: Diagonal blocks, as :meth:`~hesse.Operator.blocks` groups the parameters
            (``"param"``, ``"module"``, ``"block"``); None for the whole matrix only.
        groups: User blocks instead of ``by``.
        budget: Products per estimate (trace and each Frobenius norm).
        method: ``"hutch++"``, ``"hutchinson"`` or ``"exact"`` (``d`` products, no error).
        seed: Seed of the probes and of the Lanczos starts.
        tol: Lanczos tolerance (``hesse.eigs``).
        max_matvecs: Lanczos budget per operator.
        progress: Show progress bars.

    Returns:
        CurvatureGap.

    Raises:
        ValueError: the shapes or the parameter layouts of the two operators differ.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64))
        >>> gap = curvature_gap(A, 0.5 * A, k=2, by=None, method="exact")
        >>> gap.eigenvalue_errors.tolist(), gap.whole.trace.value
        ([0.5, 0.5], 3.5)
    """
    G = GGNOperator(exact) if isinstance(exact, Objective) else _operator(exact, None)
    K = _operator(approx, G.space)
    _check_same(G, K)
    eg, ek = (
        eigs(A, k, tol=tol, max_matvecs=max_matvecs, seed=seed, progress=progress) for A in (G, K)
    )
    estimate = dict(budget=budget, method=method, seed=seed, progress=progress)
    whole = _block_gap(G, K, estimate)
    blocks = {}
    if by is not None or groups is not None:
        ks = K.blocks(by or "module", groups)
        blocks = {
            n: _block_gap(g, ks[n], estimate) for n, g in G.blocks(by or "module", groups).items()
        }
    spent = eg.n_matvecs + sum(_spent(b) for b in (whole, *blocks.values()))
    reasons = [f"{who}: {r.reason}" for who, r in (("exact", eg), ("approx", ek)) if r.reason]
    return CurvatureGap(
        k=k,
        exact_eigenvalues=eg.values,
        approx_eigenvalues=ek.values,
        eigenvalue_errors=_relative(ek.values, eg.values),
        principal_angles=principal_angles(eg.vectors, ek.vectors),
        whole=whole,
        blocks=blocks,
        converged=eg.converged and ek.converged,
        n_matvecs=spent,
        reason="; ".join(reasons),
    )


def principal_angles(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    r"""Principal angles (radians, ascending) between the column spans of ``U`` and ``V`` (d, k).

    Example:
        >>> U = torch.eye(3, dtype=torch.float64)[:, :2]
        >>> principal_angles(U, U).tolist()
        [0.0, 0.0]
    """
    Q1, Q2 = torch.linalg.qr(U.double())[0], torch.linalg.qr(V.double())[0]
    sigma = torch.linalg.svdvals(Q1.T @ Q2).clamp(0.0, 1.0)
    return torch.arccos(sigma)


def _block_gap(G: Operator, K: Operator, estimate: dict) -> BlockGap:
    D = G - K
    diff, exact = frobenius_norm(D, **estimate), frobenius_norm(G, **estimate)
    relative = diff.value / exact.value if exact.value > 0 else math.inf
    return BlockGap(G.shape[0], trace(D, **estimate), diff, exact, relative)


def _spent(gap: BlockGap) -> int:
    return gap.trace.n_matvecs + gap.frobenius.n_matvecs + gap.exact_frobenius.n_matvecs


def _relative(approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    err = (approx - exact).abs()
    return torch.where(exact != 0, err / exact.abs().clamp_min(1e-300), math.inf)


def _operator(A, space) -> Operator:
    if isinstance(A, Operator):
        return A
    if isinstance(A, torch.Tensor):
        return DenseOperator(A, space=space)
    raise TypeError(
        f"curvature_gap: expected an Objective, an Operator or a dense tensor, got "
        f"{type(A).__name__}."
    )


def _check_same(G: Operator, K: Operator) -> None:
    if G.shape != K.shape:
        raise ValueError(
            f"curvature_gap: the exact operator is {G.shape} and the approximation {K.shape}; "
            "build both from the same Objective (the same parameters)."
        )
    if G.space is not None and K.space is not None and G.space.names != K.space.names:
        raise ValueError(
            "curvature_gap: the exact operator and the approximation order their parameters "
            "differently; build both from the same Objective."
        )
