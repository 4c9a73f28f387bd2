r"""Influence functions: how each training point moves each query's loss (Koh & Liang 2017).

The sign and scale of the scores, and the factor to each peer's, are stated once, in the
docstring of :mod:`hesse.influence`; tested against leave-one-out retraining.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..operators import (
    CURVATURES,
    KRONECKER_KINDS,
    Operator,
    WoodburyFisher,
    curvature_operator,
    kronecker_operator,
)
from ..operators.plan import plan
from ..problem._per_sample import SampleGradients, sample_gradients
from ..problem.objective import Objective
from ._grads import check_positions, check_same_layout, in_order
from ._ihvp import (
    KRONECKER,
    METHODS,
    inverse_products,
)
from ._passes import chunk_rows, count_samples, low_rank, memory_bytes, reduce_gradients
from ._projected import BLOCK, checkpoint_models, projected_scores
from ._result import InfluenceResult
from ._tokens import check_token_loss, token_scores

INFLUENCE_METHODS = (*METHODS, "projected")
"""What ``influence(ihvp=...)`` takes: the inverse products' methods and the projected one."""


def influence(
    model: nn.Module,
    train_data: Any,
    query_data: Any,
    loss: Any = None,
    *,
    loss_fn: Any = None,
    ihvp: str = "cg",
    damping: float = 0.0,
    curvature: str | None = None,
    params: Any = None,
    tol: float | None = None,
    max_matvecs: int | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    progress: bool = False,
    projection_dim: int = 1024,
    projection: str = "rademacher",
    checkpoints: Sequence[Any] | None = None,
    query_rank: int | None = None,
    per_token: bool = False,
    max_memory: int | str | None = None,
    device: torch.device | str | None = None,
) -> InfluenceResult:
    r"""Influence of every training point on every query's loss (see the module docstring).

    One pass of per-sample gradients over the queries, the inverse products
    :math:`X = (H + \lambda I)^{-1} [\nabla L_1, \dots, \nabla L_Q]`, then one pass over the
    training data that multiplies each batch's per-sample gradients :math:`w_i \nabla\ell_i`
    with :math:`X` (``"woodbury"`` keeps them all: its matrix is built from them). Per-sample
    gradients are one ``torch.func.vmap`` of ``grad`` per batch, or one backward pass per
    sample where ``vmap`` cannot run the model (Hugging Face models, ``loss_fn=``).

    Args:
        model: The trained network (eval mode; it is not modified).
        train_data: The training data, as :class:`~hesse.Objective` takes it (``(x, y)``
            batches, Hugging Face dict batches, a ``DataLoader`` that does not shuffle, or one
            batch); its mean loss is the objective the model minimizes.
        query_data: The query (test) points, in the same layout.
        loss: ``loss(outputs, targets) -> mean loss`` (e.g. ``F.cross_entropy`` or
            ``nn.CrossEntropyLoss(weight=...)``); None for a Hugging Face model's own loss
            (dict batches with ``labels``).
        loss_fn: Instead of ``loss``: ``loss_fn(model, batch) -> (mean_loss, weight)``
            (``Objective``'s; the Hessian only, as the GGN and Fisher need the outputs).
        ihvp: ``"exact"`` (dense, small ``d``), ``"cg"``, ``"lissa"`` (scale and depth chosen
            from a Lanczos :math:`\lambda_{max}`; no hand tuning), ``"woodbury"`` (the exact
            inverse of the damped empirical Fisher of the per-sample gradients), ``"kfac"`` or
            ``"ekfac"`` (the exact inverse of the damped ``KFACOperator`` / ``EKFACOperator``
            of the GGN or empirical Fisher, block by block from the factors: no products with
            the exact curvature; kronfluence's EK-FAC influence, Grosse et al. 2023).
        damping: :math:`\lambda \ge 0`; pass the weight decay the model was trained with
            (then :math:`H + \lambda I` is exactly the Hessian of its objective), and more
            when the curvature is indefinite or singular. ``"woodbury"`` needs it > 0.
        curvature: ``"hessian"`` (default), ``"ggn"`` or ``"fisher"``; ``"woodbury"`` takes
            only ``"fisher"`` (its default); ``"kfac"``/``"ekfac"`` take ``"ggn"`` (default:
            factors of kind ``"exact"``) or ``"fisher"`` (kind ``"empirical"``).
        params: Which parameters (``Objective``'s ``params=``); the rest are held fixed.
        tol: Relative residual tolerance of ``"cg"`` and ``"lissa"`` (default 1e-6 in float64,
            1e-5 otherwise).
        max_matvecs: Curvature products allowed per query (CG's budget, LiSSA's depth).
        dtype: Compute dtype (e.g. ``torch.float64`` for small models).
        seed: Seed of the Lanczos start vectors.
        progress: Progress bars over the data passes.
        projection_dim: ``"projected"``'s :math:`k`, the dimension gradients are projected to.
        projection: ``"projected"``'s random matrix: ``"rademacher"`` or ``"gaussian"``.
        checkpoints: ``"projected"`` only: models or state dicts (of ``model``'s
            architecture) whose scores are averaged (TRAK's ensemble); None: ``model`` alone.
        query_rank: Low-rank query compression: the ``(d, Q)`` inverse products
            :math:`X = (H+\lambda I)^{-1}[\nabla L_1 \dots \nabla L_Q]`, each column
            normalized, are replaced by their rank-``r`` truncated SVD (scaled back) before
            the training pass, which then holds and multiplies ``r`` columns instead of
            ``Q``; ``r >= Q`` reproduces the exact scores (to rounding). The RMS over
            queries of each one's relative error of ``X`` is in
            ``result.query_rank_error``. kronfluence's ``query_gradient_low_rank`` instead
            compresses each query's per-layer gradient matrix; this is one SVD across the
            queries, useful when ``Q`` is large and the queries alike (measured in
            ``benchmarks/influence_real``). None: no compression.
        per_token: Also compute ``result.token_scores`` ``(Q, n, T)``: the score of each
            TRAINING token, summing over ``t`` to ``scores`` (see ``_tokens.py``; token
            cross-entropy or NLL losses only; one extra pass, one double backward per query
            and batch).
        max_memory: Bytes (or ``"2GB"``, ``"500M"``, ``"1.5GiB"``) the per-sample gradients,
            inverse products and scores may hold: the training pass computes per-sample
            gradients in chunks of as many samples as fit (``result.chunk_rows``);
            refused up front when even one sample's gradient does not fit. Activations of
            the forward and backward passes, the curvature's own memory and ``per_token``'s
            ``(Q, n, T)`` token scores (in ``result.memory``) are not counted.
        device: Where the passes run (``Objective``'s ``device=``: the parameters and batches
            are moved there); None: the device of ``model``'s parameters.

    Returns:
        InfluenceResult.

    Raises:
        ValueError: an unknown ``ihvp`` or ``curvature``, ``damping < 0``, query samples shaped
            unlike the training samples, a loader that shuffles (the score columns are the
            samples in dataset order), a curvature that is indefinite once damped (the
            message names the smallest eigenvalue and the damping that fixes it), a
            ``max_memory`` that cannot hold one sample's gradient, ``query_rank < 1``, or
            ``per_token`` with a loss that has no token terms.

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
    cap = memory_bytes(max_memory)
    given = {"loss_fn": loss_fn, "params": params, "dtype": dtype, "device": device}
    if method == "projected":
        if query_rank is not None or per_token:
            raise ValueError(
                "influence(ihvp='projected'): query_rank and per_token=True are for the other "
                "methods (the projected queries are already k-dimensional)."
            )
        setting = {"k": projection_dim, "kind": projection, "seed": seed, "max_memory": cap}
        args = (train_data, query_data, loss, given, setting, curvature, damping, progress)
        models = checkpoint_models(model, checkpoints)
        return _projected(models, *args, start=start)
    if checkpoints is not None:
        raise ValueError("influence: checkpoints= is for ihvp='projected' only.")
    train = Objective(model, train_data, loss, progress=progress, **given)
    query = Objective(model, query_data, loss, **given)
    check_same_layout(train, query, "influence")
    check_positions(train, "influence", "training")
    check_positions(query, "influence", "query")
    if per_token:
        check_token_loss(train)
    queries = in_order(query, list(sample_gradients(query)))
    Q = queries.means()
    solve: dict[str, Any] = {"tol": tol, "max_matvecs": max_matvecs, "seed": seed}
    rows = _plan(train, Q.shape[0], cap, method)
    X, diag, kept = _solve(train, method, curvature, Q, damping, solve, rows, progress)
    basis, Vh, rank_error = low_rank(X, query_rank)
    reduce = (lambda g: g @ basis.to(g)) if Vh is None else (lambda g: (g @ basis.to(g)) @ Vh.to(g))
    if kept is None:
        projected, gsum, widest = reduce_gradients(train, reduce, rows=rows, progress=progress)
    else:  # "woodbury" holds every row already: no second training pass
        G, gsum, widest = kept
        projected = SampleGradients(reduce(G.grads), G.weights, G.losses)
        del G, kept  # (n, d): freed before the token pass
    W = float(projected.weights.sum())
    n = projected.weights.shape[0]
    tokens = None
    if per_token:
        X_used = basis if Vh is None else basis @ Vh
        tokens = token_scores(train, X_used, W, progress=progress)
    memory = _memory(train, method, curvature, n, Q.shape[0], widest)
    if tokens is not None:
        memory = memory | {"token_scores": tokens.numel() * 8}
        memory["total"] += memory["token_scores"]
    return InfluenceResult(
        scores=projected.grads.T.double() / W,
        query_losses=queries.losses.double(),
        train_losses=projected.losses.double(),
        train_weights=projected.weights,
        ihvp=method,
        curvature=curvature,
        inverse=diag,
        gradient_norm=float((gsum / W).norm()),
        memory=memory,
        seconds=time.perf_counter() - start,
        token_scores=tokens,
        chunk_rows=widest,
        query_rank=None if Vh is None else Vh.shape[0],
        query_rank_error=rank_error,
    )


def _solve(train: Objective, method: str, curvature: str, Q: torch.Tensor, damping: float,
           solve: dict[str, Any], rows: int | None, progress: bool) -> tuple:  # fmt: skip
    """``(X (d, Q), diagnostics, kept)``: the inverse products of the query gradients ``Q``.

    ``kept`` is ``"woodbury"``'s training pass ``(rows, gradient sum, widest chunk)``, which
    the scores reuse; None for the other methods.
    """
    if method == "woodbury":
        kept = reduce_gradients(train, lambda g: g, rows=rows, progress=progress)
        F = _woodbury(kept[0], damping, train)
        return (*inverse_products(F, Q.T, method=method, damping=0.0, **solve), kept)
    op: Operator = (
        kronecker_operator(train, method, curvature)
        if method in KRONECKER
        else curvature_operator(train, curvature)
    )
    return (*inverse_products(op, Q.T, method=method, damping=damping, **solve), None)


def _plan(train: Objective, q: int, cap: int | None, method: str) -> int | None:
    """Per-sample gradient rows per chunk that fit ``cap`` (None: whole batches).

    Fixed: the inverse products (and the query gradients) ``2 q d`` and the scores ``q n``
    in float64; ``"woodbury"`` keeps all ``n`` rows.
    """
    if cap is None:
        return None
    n = count_samples(train)
    item = torch.empty((), dtype=train.dtype).element_size()
    fixed = 2 * q * train.dim * 8 + q * n * 8
    return chunk_rows(train.dim, item, fixed, cap, keep_all=n if method == "woodbury" else 0)


def _check(ihvp: str, curvature: str | None, damping: float) -> tuple[str, str]:
    """Validate the method settings before any data pass; returns ``(ihvp, curvature)``."""
    if ihvp not in INFLUENCE_METHODS:
        raise ValueError(f"influence: ihvp must be one of {INFLUENCE_METHODS}, got {ihvp!r}.")
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
    if ihvp in KRONECKER:
        return ihvp, _kronecker_curvature(ihvp, curvature)
    if ihvp == "projected":
        if curvature not in (None, "fisher", "ggn"):
            raise ValueError(
                f"influence(ihvp='projected') projects the empirical Fisher "
                f"(curvature='fisher', default) or the GGN (curvature='ggn'), not the "
                f"{curvature!r}; pass one of those, or ihvp='cg' for the {curvature!r}."
            )
        return ihvp, curvature or "fisher"
    curvature = curvature or "hessian"
    if curvature not in CURVATURES:
        raise ValueError(
            f"influence: curvature must be one of {tuple(CURVATURES)}, got {curvature!r}."
        )
    return ihvp, curvature


def _kronecker_curvature(ihvp: str, curvature: str | None) -> str:
    """The curvature whose Kronecker factors ``ihvp`` inverts: the GGN unless told otherwise."""
    if curvature not in (None, *KRONECKER_KINDS):
        raise ValueError(
            f"influence(ihvp={ihvp!r}) inverts a Kronecker-factored approximation of the GGN "
            f"(curvature='ggn') or of the empirical Fisher (curvature='fisher'), not of the "
            f"{curvature!r}; pass one of those, or ihvp='cg' for the {curvature!r}."
        )
    return curvature or "ggn"


def _woodbury(rows: SampleGradients, damping: float, train: Objective) -> WoodburyFisher:
    r"""The damped empirical Fisher :math:`\lambda I + \frac1W \sum_i \nabla s_i \nabla s_i^\top`.

    ``WoodburyFisher`` divides by its row count ``m``; the rows are scaled by
    :math:`\sqrt{m / W}` so that the sum is divided by the objective's weight :math:`W`, as in
    ``FisherOperator`` (equal to it for losses with one term per sample).
    """
    G = rows.grads
    W = float(rows.weights.sum())
    if W == 0:
        raise ValueError(
            "influence: the training data has total weight 0: every label is ignored (equal to "
            "the loss's ignore_index, -100 by default) or has class weight 0; check the labels."
        )
    return WoodburyFisher(G * (G.shape[0] / W) ** 0.5, damping, space=train.space)


def _memory(train: Objective, method: str, curvature: str, n: int, q: int, rows: int) -> dict:
    """Bytes of the large items of a run (see ``InfluenceResult.memory``)."""
    d, item = train.dim, torch.empty((), dtype=train.dtype).element_size()
    rows = n if method == "woodbury" else rows  # woodbury keeps them all
    out = {
        "per_sample_gradients": rows * d * item,
        "inverse_products": 2 * q * d * 8,
        "scores": q * n * 8,
    }
    if method == "woodbury":
        out["gram_and_cholesky"] = 2 * n * n * 8
    elif method == "exact":
        out["dense_curvature"] = 2 * d * d * 8
    if method in KRONECKER:  # KFAC's factors (EKFAC holds them while it builds) and the
        # eigenbases: KFAC's inverse forms them, EKFAC keeps them with its scalings
        kfac = KRONECKER["kfac"].factor_bytes(train)
        out["kronecker_factors"] = kfac + KRONECKER[method].factor_bytes(train)
    elif method != "woodbury":
        p = plan(train, k=1, steps=1, probes=1, curvature=curvature)
        out["operator_graphs"] = p.graphs_bytes
    return out | {"total": sum(out.values())}


def _projected(models, train_data, query_data, loss, given, setting, curvature, damping,
               progress, *, start) -> InfluenceResult:  # fmt: skip
    """``ihvp="projected"``: one model's projected scores, or their mean over checkpoints."""
    runs = []
    for m in models:
        train = Objective(m, train_data, loss, progress=progress, **given)
        query = Objective(m, query_data, loss, **given)
        check_same_layout(train, query, "influence")
        check_positions(train, "influence", "training")
        check_positions(query, "influence", "query")
        run = projected_scores(
            train, query, curvature=curvature, damping=damping, progress=progress, **setting
        )
        runs.append(run)
    last, n_ckpt = runs[-1], len(runs)
    rows, W = last.train, float(last.train.weights.sum())
    n, q, k = rows.grads.shape[0], last.scores.shape[0], setting["k"]
    d, item = train.dim, torch.empty((), dtype=train.dtype).element_size()
    memory = {
        "per_sample_gradients": last.widest * d * item,
        "projected_gradients": (n + q) * k * 8,
        "projection_block": k * BLOCK * 8,
        "projected_curvature": 2 * k * k * 8,
        "scores": q * n * 8 * (2 if n_ckpt > 1 else 1),
    }
    return InfluenceResult(
        scores=torch.stack([r.scores for r in runs]).mean(0),
        query_losses=last.queries.losses.double(),
        train_losses=rows.losses.double(),
        train_weights=rows.weights,
        ihvp="projected",
        curvature=curvature,
        inverse=last.inverse,
        gradient_norm=float((last.gradient_sum / W).norm()),
        memory=memory | {"total": sum(memory.values())},
        seconds=time.perf_counter() - start,
        chunk_rows=last.widest,
    )
