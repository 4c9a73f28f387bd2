r"""Projected influence: the curvature inverted in a seeded random k-dimensional subspace.

TRAK (Park, Georgiev, Ilyas, Leclerc & Madry 2023, "TRAK: Attributing model behavior at
scale") and LoGra (Choe et al. 2024, "What is your data worth to GPT?") project every
per-sample gradient to :math:`k \ll d` dimensions with a random matrix :math:`P` and invert
the curvature there, where it is a small dense :math:`k \times k` matrix:

.. math::
    \mathrm{scores}[q, i] = \frac{1}{W}\, (P\nabla L_q)^\top
        (P A P^\top + \lambda I_k)^{-1} (P \nabla s_i),

hesse's influence formula (``scores.py``) with :math:`(A + \lambda I)^{-1}` replaced by
:math:`P^\top (P A P^\top + \lambda I_k)^{-1} P`; it equals it when :math:`P` is square and
invertible and :math:`\lambda = 0`, and by Johnson-Lindenstrauss approaches it as :math:`k`
grows. :math:`A` is the empirical Fisher :math:`\frac1W\sum_i \nabla s_i \nabla s_i^\top`
(``curvature="fisher"``, default: then :math:`PAP^\top = \Phi^\top\Phi / W` with
:math:`\Phi` the projected rows, TRAK's matrix) or the GGN (``curvature="ggn"``: :math:`k`
GGN products, one data pass per 64 of them).

:math:`P` has entries :math:`\pm 1/\sqrt{k}` (``"rademacher"``) or :math:`N(0, 1/k)`
(``"gaussian"``), so :math:`E[P^\top P] = I`. It is generated in blocks of ``BLOCK`` columns,
block ``b`` from the seed ``(seed, b)``: the same seed gives the same :math:`P` whatever the
batch sizes, and no more than ``k x BLOCK`` of it exists at once.

TRAK differentiates the margin :math:`\log p_y - \log(1 - p_y)` and multiplies by
:math:`1 - p_y`; hesse differentiates the loss (the cross-entropy), keeping influence's sign
and scale, see ``hesse.influence``'s module docstring for the factors to each peer.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..operators import curvature_operator
from ..problem._per_sample import SampleGradients
from ..problem.objective import Objective
from ._ihvp import InverseDiagnostics
from ._passes import chunk_rows, count_samples, reduce_gradients

PROJECTIONS = ("rademacher", "gaussian")
BLOCK = 1 << 15
"""Columns of :math:`P` generated at once."""
GGN_COLUMNS = 64
r"""Columns of :math:`P^\top` multiplied by the GGN in one data pass."""


def projection_block(b: int, d: int, k: int, kind: str, seed: int) -> torch.Tensor:
    """Columns ``b * BLOCK`` to ``(b + 1) * BLOCK`` of :math:`P` ``(k, d)``, float64 on the CPU.

    Raises:
        ValueError: an unknown ``kind``, ``k < 1`` or a block past ``d``.
    """
    if kind not in PROJECTIONS:
        raise ValueError(f"projection: kind must be one of {PROJECTIONS}, got {kind!r}.")
    if k < 1 or not 0 <= b * BLOCK < d:
        raise ValueError(
            f"projection: need k >= 1 and block {b} (columns from {b * BLOCK}) within d={d}, "
            f"got k={k}; pass projection_dim >= 1."
        )
    cols = min(BLOCK, d - b * BLOCK)
    g = torch.Generator().manual_seed(seed * 1_000_003 + b)
    if kind == "gaussian":
        return torch.randn(k, cols, generator=g, dtype=torch.float64) / math.sqrt(k)
    signs = torch.randint(0, 2, (k, cols), generator=g).to(torch.float64) * 2 - 1
    return signs / math.sqrt(k)


def projection_matrix(d: int, k: int, kind: str = "rademacher", seed: int = 0) -> torch.Tensor:
    """The dense :math:`P` ``(k, d)`` float64 (for small ``d``: tests and inspection)."""
    return torch.cat([projection_block(b, d, k, kind, seed) for b in range(_n_blocks(d))], 1)


def _n_blocks(d: int) -> int:
    """Blocks of ``BLOCK`` columns that cover ``d`` (the last may be narrower)."""
    return -(-d // BLOCK)


def project(G: torch.Tensor, k: int, kind: str, seed: int) -> torch.Tensor:
    r"""``(n, k)`` rows :math:`G P^\top` of ``G`` ``(n, d)``, block by block, in ``G``'s dtype."""
    d = G.shape[1]
    out = torch.zeros(G.shape[0], k, dtype=G.dtype, device=G.device)
    for b in range(_n_blocks(d)):
        P = projection_block(b, d, k, kind, seed).to(G)
        out += G[:, b * BLOCK : b * BLOCK + P.shape[1]] @ P.T
    return out


def lift(Y: torch.Tensor, d: int, kind: str, seed: int) -> torch.Tensor:
    """``(m, d)`` rows :math:`Y P` of ``Y`` ``(m, k)``: the transpose of :func:`project`."""
    k = Y.shape[1]
    blocks = [Y @ projection_block(b, d, k, kind, seed).to(Y) for b in range(_n_blocks(d))]
    return torch.cat(blocks, 1)


def projected_rows(
    obj: Objective, k: int, kind: str, seed: int, *, rows: int | None = None,
    progress: bool = False,
) -> tuple[SampleGradients, torch.Tensor, int]:  # fmt: skip
    r"""The per-sample gradients, ``rows`` samples at a time, projected as they come.

    Returns:
        ``(rows, gradient sum, widest chunk)``: rows :math:`P\nabla s_i` ``(n, k)`` float64
        on the CPU (the ``k x k`` solve runs there) in dataset order, with their weights and
        losses; :math:`\sum_i \nabla s_i` ``(d,)``.
    """
    return reduce_gradients(
        obj, lambda g: project(g, k, kind, seed).double().cpu(), rows=rows, progress=progress
    )


def projected_curvature(
    train: Objective, Phi: torch.Tensor, W: float, curvature: str, kind: str, seed: int
) -> tuple[torch.Tensor, int]:
    r""":math:`P A P^\top` ``(k, k)`` float64 and the curvature products it took."""
    if curvature == "fisher":
        return Phi.T @ Phi / W, 0
    k, d = Phi.shape[1], train.dim
    op = curvature_operator(train, curvature, who="influence(ihvp='projected')")
    eye = torch.eye(k, dtype=torch.float64)
    rows = []
    for r in range(0, k, GGN_COLUMNS):
        V = lift(eye[r : r + GGN_COLUMNS], d, kind, seed).to(train.dtype)  # rows of P
        rows.append(project((op @ V.T.to(train.device)).T, k, kind, seed).double().cpu())
    M = torch.cat(rows)
    return (M + M.T) / 2, k


def solve_projected(
    M: torch.Tensor, B: torch.Tensor, damping: float, products: int
) -> tuple[torch.Tensor, InverseDiagnostics]:
    r""":math:`(M + \lambda I)^{-1} B` by Cholesky, with the eigenvalues and residuals of ``M``.

    Raises:
        ValueError: ``M + λI`` not positive definite (the message names the damping to pass).
    """
    start = time.perf_counter()
    values = torch.linalg.eigvalsh(M)
    lam_min, lam_max = float(values[0]), float(values[-1])
    A = M + damping * torch.eye(M.shape[0], dtype=M.dtype)
    L, info = torch.linalg.cholesky_ex(A)
    if info != 0 or lam_min + damping <= 1e-12 * max(lam_max, 1.0):
        raise ValueError(
            f"influence(ihvp='projected'): the projected curvature ({M.shape[0]} x "
            f"{M.shape[0]}) is singular once damped: its smallest eigenvalue is {lam_min:.3g} "
            f"and damping={damping:g}. The empirical Fisher of n samples has rank <= n: pass "
            f"damping > 0 (e.g. {max(1e-3 * lam_max, 1e-8):.3g}) or a projection_dim below the "
            "number of training samples."
        )
    X = torch.cholesky_solve(B, L)
    R = (B - A @ X).norm(dim=0) / B.norm(dim=0).clamp_min(1e-300)
    diag = InverseDiagnostics(
        "projected",
        damping,
        bool((R <= 1e-6).all()),
        products,
        R,
        1e-6,
        lam_max=lam_max,
        lam_min=lam_min,
        seconds=time.perf_counter() - start,
    )
    return X, diag


def checkpoint_models(model: nn.Module, checkpoints: Sequence[Any] | None) -> list[nn.Module]:
    """The models to ensemble over: ``model`` alone, or one per checkpoint.

    Args:
        model: The trained network; a checkpoint given as a state dict is loaded into a deep
            copy of it.
        checkpoints: None, or ``nn.Module`` s and/or state dicts (TRAK's checkpoints).

    Raises:
        ValueError: an empty list, or an item that is neither a module nor a mapping.
    """
    if checkpoints is None:
        return [model]
    if len(checkpoints) == 0:
        raise ValueError("influence: checkpoints is empty; pass None to use model alone.")
    models = []
    for i, c in enumerate(checkpoints):
        if isinstance(c, nn.Module):
            models.append(c)
        elif isinstance(c, Mapping):
            m = copy.deepcopy(model)
            m.load_state_dict(c)
            models.append(m.eval())
        else:
            raise ValueError(
                f"influence: checkpoints[{i}] is a {type(c).__name__}; pass nn.Modules or "
                "state dicts (model.state_dict())."
            )
    return models


@dataclass(frozen=True)
class ProjectedRun:
    r"""One model's projected scores and what they are made of.

    Attributes:
        scores: ``(Q, n)`` float64 projected scores (module docstring).
        queries: The queries' projected rows :math:`P\nabla s_q` ``(Q, k)`` (SampleGradients).
        train: The training points' projected rows ``(n, k)``, weights and losses.
        inverse: Diagnostics of the ``k x k`` solve.
        gradient_sum: :math:`\sum_i \nabla s_i` ``(d,)`` float64 of the training data.
        widest: The most per-sample gradient rows held at once.
    """

    scores: torch.Tensor
    queries: SampleGradients
    train: SampleGradients
    inverse: InverseDiagnostics
    gradient_sum: torch.Tensor
    widest: int


def projected_scores(
    train: Objective, query: Objective, *, k: int, kind: str, curvature: str, damping: float,
    seed: int, max_memory: int | None = None, progress: bool = False,
) -> ProjectedRun:  # fmt: skip
    r"""One model's projected scores (module docstring) and what they cost.

    Args:
        train: The training objective.
        query: The queries' objective.
        k: The projected dimension.
        kind: ``"rademacher"`` or ``"gaussian"``.
        curvature: ``"fisher"`` or ``"ggn"``.
        damping: :math:`\lambda` added in the projected space.
        seed: Seed of :math:`P`.
        max_memory: Bytes the per-sample gradients and projected rows may hold (chunks
            chosen to fit, see ``_passes.chunk_rows``); None: whole batches.
        progress: A progress bar over the training samples.

    Raises:
        ValueError: total training weight 0, a singular projected curvature, or a
            ``max_memory`` that cannot hold one sample's gradient.
    """
    item = torch.empty((), dtype=train.dtype).element_size()
    rows = None
    if max_memory is not None:
        n, q = count_samples(train), count_samples(query)
        # the k x k solve, one block of P, the projected rows of every sample, the scores
        fixed = (2 * k * k + k * BLOCK + (n + q) * k + q * n) * 8
        rows = chunk_rows(train.dim, item, fixed, max_memory)
    queries, _, _ = projected_rows(query, k, kind, seed, rows=rows)
    train_rows, gsum, widest = projected_rows(train, k, kind, seed, rows=rows, progress=progress)
    W = float(train_rows.weights.sum())
    if W == 0:
        raise ValueError(
            "influence: the training data has total weight 0: every label is ignored or has "
            "class weight 0; check the labels."
        )
    M, products = projected_curvature(train, train_rows.grads, W, curvature, kind, seed)
    X, diag = solve_projected(M, queries.means().T, damping, products)
    scores = (train_rows.grads @ X).T / W
    return ProjectedRun(scores, queries, train_rows, diag, gsum, widest)
