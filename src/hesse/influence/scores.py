r"""Influence functions: how each training point moves each query's loss (Koh & Liang 2017).

The convention, stated once (and tested against leave-one-out retraining): for a training
objective that is the MEAN loss over :math:`n` points (plus, optionally, weight decay
:math:`\frac{\lambda}{2}\|\theta\|^2`, which ``damping=λ`` accounts for exactly),

.. math::
    \mathrm{scores}[q, i] = \frac{1}{n}\, \nabla L_q(\hat\theta)^\top
        (H + \lambda I)^{-1} \nabla \ell_i(\hat\theta)
    \;\approx\; L_q(\hat\theta_{-i}) - L_q(\hat\theta),

the predicted change of query :math:`q`'s loss when training point :math:`i` is REMOVED
(its term :math:`\ell_i/n` dropped from the objective, the model retrained). Positive: the
point helps the query (removing it raises the query's loss); negative: it harms it. This is
Koh & Liang's :math:`-\mathcal{I}_{up,loss}/n`; kronfluence's pairwise scores are not
divided by :math:`n`; captum's ``NaiveInfluenceFunction`` at full rank equals it (measured in
``benchmarks/influence``) when its ``hessian_reg`` is :math:`n\lambda`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..objective import Objective
from ..operators import CURVATURES, WoodburyFisher, curvature_operator
from ..plan import plan
from ._grads import check_same_layout, sample_gradients
from ._ihvp import METHODS, InverseDiagnostics, inverse_products


@dataclass(frozen=True)
class TopInfluences:
    """The training points that most help and most harm one query (or the mean query loss).

    Attributes:
        query: Row of ``scores`` (None: the mean over all queries).
        helpful: ``(k,)`` training indices with the largest scores (removing them raises the
            query's loss most), largest first.
        helpful_scores: Their scores.
        harmful: ``(k,)`` indices with the most negative scores (removing them lowers it most).
        harmful_scores: Their scores, most negative first.
    """

    query: int | None
    helpful: torch.Tensor
    helpful_scores: torch.Tensor
    harmful: torch.Tensor
    harmful_scores: torch.Tensor


@dataclass(frozen=True)
class InfluenceResult:
    r"""Influence scores and what they cost.

    Attributes:
        scores: ``(n_query, n_train)`` float64: predicted change of query ``q``'s loss when
            training point ``i`` is removed, :math:`\frac1n \nabla L_q^\top (H+\lambda I)^{-1}
            \nabla\ell_i` (see the module docstring for the sign).
        query_losses: ``(n_query,)`` losses of the queries.
        train_losses: ``(n_train,)`` losses of the training points.
        ihvp: The inverse method; ``curvature`` the matrix inverted (``"fisher"``: the
            empirical Fisher of the per-sample gradients, for ``"woodbury"``).
        curvature: ``"hessian"``, ``"ggn"`` or ``"fisher"``.
        inverse: Diagnostics of the inverse products (converged, residuals, matvecs, LiSSA's
            scale and depth).
        gradient_norm: :math:`\|\nabla L(\hat\theta)\|` of the training loss: influence
            assumes :math:`\hat\theta` minimizes the (regularized) objective.
        memory: Bytes of the large items (per-sample gradients, inverse products, scores,
            dense or Gram matrices, the operator's kept graphs from ``hesse.plan``).
        seconds: Wall-clock time.
    """

    scores: torch.Tensor
    query_losses: torch.Tensor
    train_losses: torch.Tensor
    ihvp: str
    curvature: str
    inverse: InverseDiagnostics
    gradient_norm: float
    memory: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def converged(self) -> bool:
        """Whether every inverse product met its tolerance."""
        return self.inverse.converged

    def top(self, query: int | None = None, k: int = 5) -> TopInfluences:
        """The ``k`` most helpful and most harmful training points for one query.

        Args:
            query: Row of :attr:`scores`, or None for the mean query loss (the mean of rows).
            k: How many of each.

        Raises:
            IndexError: ``query`` out of range.
        """
        n_query, n = self.scores.shape
        if query is not None and not -n_query <= query < n_query:
            raise IndexError(f"top: query {query} out of range for {n_query} queries.")
        row = self.scores.mean(0) if query is None else self.scores[query]
        k = min(k, n)
        up = torch.topk(row, k)
        down = torch.topk(-row, k)
        return TopInfluences(query, up.indices, up.values, down.indices, -down.values)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the score matrix, as plain numbers (for a JSON report)."""
        return {
            "ihvp": self.ihvp,
            "curvature": self.curvature,
            "n_query": self.scores.shape[0],
            "n_train": self.scores.shape[1],
            "inverse": self.inverse.to_dict(),
            "gradient_norm": self.gradient_norm,
            "memory": self.memory,
            "seconds": self.seconds,
        }


def influence(
    model: nn.Module,
    train_data: Any,
    query_data: Any,
    loss: Any = None,
    *,
    ihvp: str = "cg",
    damping: float = 0.0,
    curvature: str | None = None,
    params: Any = None,
    tol: float | None = None,
    max_matvecs: int | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    progress: bool = False,
) -> InfluenceResult:
    r"""Influence of every training point on every query's loss (see the module docstring).

    One pass of per-sample gradients (``torch.func.vmap`` of ``grad``) over the queries, the
    inverse products :math:`X = (H + \lambda I)^{-1} [\nabla L_1, \dots, \nabla L_Q]`, then one
    pass over the training data that multiplies each batch's per-sample gradients with
    :math:`X` (``"woodbury"`` keeps them all: its matrix is built from them).

    Args:
        model: The trained network (eval mode; it is not modified).
        train_data: The training data (list of ``(x, y)`` batches, a ``DataLoader`` or one
            batch); its mean loss is the objective the model minimizes.
        query_data: The query (test) points, in the same layout.
        loss: ``loss(outputs, targets) -> mean loss`` (e.g. ``F.cross_entropy``).
        ihvp: ``"exact"`` (dense, small ``d``), ``"cg"``, ``"lissa"`` (scale and depth chosen
            from a Lanczos :math:`\lambda_{max}`; no hand tuning) or ``"woodbury"`` (the exact
            inverse of the damped empirical Fisher of the per-sample gradients).
        damping: :math:`\lambda \ge 0`; pass the weight decay the model was trained with
            (then :math:`H + \lambda I` is exactly the Hessian of its objective), and more
            when the curvature is indefinite or singular. ``"woodbury"`` needs it > 0.
        curvature: ``"hessian"`` (default), ``"ggn"`` or ``"fisher"``; ``"woodbury"`` takes
            only ``"fisher"`` (its default).
        params: Which parameters (``Objective``'s ``params=``); the rest are held fixed.
        tol: Relative residual tolerance of ``"cg"`` and ``"lissa"`` (default 1e-6 in float64,
            1e-5 otherwise).
        max_matvecs: Curvature products allowed per query (CG's budget, LiSSA's depth).
        dtype: Compute dtype (e.g. ``torch.float64`` for small models).
        seed: Seed of the Lanczos start vectors.
        progress: Progress bars over the data passes.

    Returns:
        InfluenceResult.

    Raises:
        ValueError: an unknown ``ihvp`` or ``curvature``, ``damping < 0``, query samples shaped
            unlike the training samples, or a curvature that is indefinite once damped (the
            message names the smallest eigenvalue and the damping that fixes it).

    Example:
        >>> import torch.nn.functional as F
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(30, 3, generator=g, dtype=torch.float64), torch.arange(30) % 2
        >>> model = nn.Linear(3, 2).double().eval()
        >>> r = influence(model, [(x, y)], [(x[:2], y[:2])], F.cross_entropy, damping=0.1)
        >>> r.scores.shape, r.converged
        (torch.Size([2, 30]), True)
    """
    start = time.perf_counter()
    method, curvature = _check(ihvp, curvature, damping)
    train = Objective(model, train_data, loss, params=params, dtype=dtype, progress=progress)
    query = Objective(model, query_data, loss, params=params, dtype=dtype)
    check_same_layout(train, query, "influence")
    Q, query_losses = _all(sample_gradients(query))
    solve = {"tol": tol, "max_matvecs": max_matvecs, "seed": seed}
    if method == "woodbury":
        G, train_losses = _all(sample_gradients(train))
        F = WoodburyFisher(G, damping, space=train.space)
        X, diag = inverse_products(F, Q.T, method=method, damping=0.0, **solve)
        scores, gsum, widest = (G @ X).T, G.sum(0), G.shape[0]
    else:
        op = curvature_operator(train, curvature)
        X, diag = inverse_products(op, Q.T, method=method, damping=damping, **solve)
        scores, train_losses, gsum, widest = _stream(train, X)
    n = scores.shape[1]
    memory = _memory(train, method, curvature, n, Q.shape[0], widest)
    return InfluenceResult(
        scores=scores.double() / n,
        query_losses=query_losses.double(),
        train_losses=train_losses.double(),
        ihvp=method,
        curvature=curvature,
        inverse=diag,
        gradient_norm=float((gsum / n).norm()),
        memory=memory,
        seconds=time.perf_counter() - start,
    )


def _check(ihvp: str, curvature: str | None, damping: float) -> tuple[str, str]:
    """Validate the method settings before any data pass; returns ``(ihvp, curvature)``."""
    if ihvp not in METHODS:
        raise ValueError(f"influence: ihvp must be one of {METHODS}, got {ihvp!r}.")
    if not damping >= 0:
        raise ValueError(
            f"influence: damping must be >= 0, got {damping}; pass the weight decay the model "
            "was trained with, or a small positive value."
        )
    if ihvp == "woodbury":
        if curvature not in (None, "fisher"):
            raise ValueError(
                f"influence(ihvp='woodbury') inverts the damped empirical Fisher of the "
                f"per-sample gradients, not the {curvature!r}; pass curvature='fisher' (or "
                "None), or ihvp='cg' for the Hessian or GGN."
            )
        if not damping > 0:
            raise ValueError(
                "influence(ihvp='woodbury'): the empirical Fisher of n gradients has rank <= n "
                "and is singular; pass damping > 0 (e.g. 1e-3)."
            )
        return ihvp, "fisher"
    curvature = curvature or "hessian"
    if curvature not in CURVATURES:
        raise ValueError(
            f"influence: curvature must be one of {tuple(CURVATURES)}, got {curvature!r}."
        )
    return ihvp, curvature


def _all(chunks) -> tuple[torch.Tensor, torch.Tensor]:
    grads, losses = zip(*chunks, strict=True)
    return torch.cat(grads), torch.cat(losses)


def _stream(train: Objective, X: torch.Tensor):
    """Scores (unscaled), losses, gradient sum and widest batch, one batch at a time."""
    cols, losses, gsum, widest = [], [], 0.0, 0
    for G, lb in sample_gradients(train):
        cols.append(X.T.to(G.dtype) @ G.T)
        losses.append(lb)
        gsum = gsum + G.sum(0)
        widest = max(widest, G.shape[0])
    return torch.cat(cols, 1), torch.cat(losses), gsum, widest


def _memory(train: Objective, method: str, curvature: str, n: int, q: int, rows: int) -> dict:
    """Bytes of the large items of a run (see ``InfluenceResult.memory``)."""
    d, item = train.dim, torch.empty((), dtype=train.dtype).element_size()
    out = {
        "per_sample_gradients": rows * d * item,
        "inverse_products": 2 * q * d * 8,
        "scores": q * n * 8,
    }
    if method == "woodbury":
        out["gram_and_cholesky"] = 2 * n * n * 8
    elif method == "exact":
        out["dense_curvature"] = 2 * d * d * 8
    if method != "woodbury":
        p = plan(train, k=1, steps=1, probes=1, curvature=curvature)
        out["operator_graphs"] = p.graphs_bytes
    return out | {"total": sum(out.values())}
