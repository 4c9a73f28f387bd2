"""The result of :func:`~hesse.influence.influence`: scores, diagnostics and the top points."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ._ihvp import InverseDiagnostics


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
            training point ``i`` is removed, :math:`\frac{w_i}{W} \nabla L_q^\top
            (H+\lambda I)^{-1} \nabla\ell_i` (see the module docstring for the sign). Rows
            and columns are the samples in dataset order (by ``Objective.sample_positions``:
            the dataset index of a ``DataLoader``'s sample, the running count over a list of
            batches).
        query_losses: ``(n_query,)`` losses of the queries, each its own mean loss (0 for a
            query whose targets are all ignored).
        train_losses: ``(n_train,)`` :math:`\ell_i`, each training point's own mean loss (0
            for a point whose targets are all ignored: it has weight 0).
        train_weights: ``(n_train,)`` float64 :math:`w_i`, the weight of each training point
            in the objective (1 per sample for a plain mean; counted tokens; class weights).
        ihvp: The inverse method; ``curvature`` the matrix inverted (``"fisher"``: the
            empirical Fisher of the per-sample gradients, for ``"woodbury"`` and, by default,
            ``"projected"``).
        curvature: ``"hessian"``, ``"ggn"`` or ``"fisher"``. For ``"kfac"`` and ``"ekfac"``
            the matrix inverted is the Kronecker-factored APPROXIMATION of this curvature
            (``inverse.approximates``), so the scores approximate the ``"exact"`` ones.
        inverse: Diagnostics of the inverse products (converged, residuals, matvecs, LiSSA's
            scale and depth).
        gradient_norm: :math:`\|\nabla L(\hat\theta)\|` of the training loss: influence
            assumes :math:`\hat\theta` minimizes the (regularized) objective.
        memory: Bytes of the large items (per-sample gradients, inverse products, scores,
            dense or Gram matrices, the operator's kept graphs from ``hesse.plan``).
        seconds: Wall-clock time.
        token_scores: ``influence(per_token=True)``: ``(n_query, n_train, T)`` float64, the
            score of each training TOKEN (label position ``t``; for causal LMs the token
            predicted), summing over ``t`` to :attr:`scores`; else None.
        query_rank: ``influence(query_rank=r)``: the rank the inverse products were
            truncated to (None: not compressed).
        query_rank_error: The truncation's error: the root-mean-square over queries of
            each query's relative error of its inverse product (0: exact).
        chunk_rows: The most per-sample gradient rows held at once in the training pass (a
            batch, or the chunk ``max_memory`` allowed).
    """

    scores: torch.Tensor
    query_losses: torch.Tensor
    train_losses: torch.Tensor
    train_weights: torch.Tensor
    ihvp: str
    curvature: str
    inverse: InverseDiagnostics
    gradient_norm: float
    memory: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    token_scores: torch.Tensor | None = None
    query_rank: int | None = None
    query_rank_error: float = 0.0
    chunk_rows: int = 0

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
            "query_rank": self.query_rank,
            "query_rank_error": self.query_rank_error,
            "chunk_rows": self.chunk_rows,
        }
