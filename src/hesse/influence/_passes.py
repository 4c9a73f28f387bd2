r"""The training pass of influence: per-sample gradients in memory-planned chunks, reduced.

A batch's per-sample gradients are an ``(n_b, d)`` matrix; for a large model one row is
already big (``d`` numbers), so the training pass computes them ``rows`` samples at a time
(:func:`chunk_rows` chooses ``rows`` to fit ``max_memory``), reduces each chunk at once
(times the inverse products, or through the projection) and keeps only the reduced rows. A
progress bar over the training samples shows the rate and the time left (tqdm's ETA).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from ..operators._memory import size_bytes
from ..problem._per_sample import SampleGradients, batch_gradients
from ..problem._positions import rows_of, samples_in
from ..problem.objective import Objective
from ._grads import in_order

"""Decimal units of a size string; ``Ki``, ``Mi``, ``Gi``, ``Ti`` are binary."""


def memory_bytes(size: int | str | None) -> int | None:
    """Bytes of ``max_memory=`` (see :func:`~hesse.operators._memory.size_bytes`; None: None).

    Example:
        >>> memory_bytes("2GB"), memory_bytes("1.5GiB"), memory_bytes(4096)
        (2000000000, 1610612736, 4096)
    """
    return None if size is None else size_bytes(size, "influence: max_memory")


def chunk_rows(
    d: int, item: int, fixed: int, max_memory: int | None, *, keep_all: int = 0
) -> int | None:
    """Per-sample gradient rows held at once so that ``fixed`` plus the rows fit ``max_memory``.

    Args:
        d: Parameters per row.
        item: Bytes per number.
        fixed: Bytes held whatever the chunk (inverse products, scores, factors).
        max_memory: The cap in bytes (None: no plan, whole batches).
        keep_all: When > 0, the run keeps this many rows at once (``"woodbury"``'s ``n``).

    Returns:
        Rows per chunk (None: whole batches).

    Raises:
        ValueError: even one row (or the ``keep_all`` rows) does not fit; the message gives
            the bytes needed and what to change.
    """
    if max_memory is None:
        return None
    row = d * item
    need = fixed + max(keep_all, 1) * row
    if need > max_memory:
        what = (
            f"all {keep_all} per-sample gradients ({keep_all} x {d} numbers: ihvp='woodbury' "
            "keeps them)"
            if keep_all
            else f"one per-sample gradient ({d} numbers)"
        )
        raise ValueError(
            f"influence: max_memory={max_memory} bytes cannot hold {what} plus the "
            f"{fixed} bytes held whatever the chunk (inverse products or projected rows, and "
            f"scores): it needs {need} bytes. Raise max_memory, pass fewer queries or "
            "parameters (params=), a float32 dtype, or ihvp='projected' (a smaller "
            "projection_dim if it is already)."
        )
    return max(1, (max_memory - fixed) // row)


def count_samples(obj: Objective) -> int:
    """The samples of an objective's data (a pass over the batches, no model call)."""
    return sum(samples_in(b, "influence") for b in obj.batches())


def reduce_gradients(
    obj: Objective,
    reduce: Callable[[torch.Tensor], torch.Tensor],
    *,
    rows: int | None = None,
    progress: bool = False,
    desc: str = "influence: training points",
) -> tuple[SampleGradients, torch.Tensor, int]:
    r"""Per-sample gradients, ``rows`` at a time, each chunk reduced at once; dataset order.

    Args:
        obj: The objective whose samples are the rows.
        reduce: ``(m, d) -> (m, r)`` applied to each chunk's :math:`\nabla s_i` rows (e.g.
            ``G @ X``, or a projection).
        rows: Samples per chunk (None: whole batches).
        progress: A progress bar over the samples with the time left.
        desc: The bar's label.

    Returns:
        ``(reduced rows (n, r) with their weights and losses, the gradient sum (d,) float64
        on the CPU, the most rows held at once)``.
    """
    quiet = copy.copy(obj)
    quiet.progress = False  # one bar, over samples, instead of the objective's over batches
    total = count_samples(quiet) if progress else None
    bar = tqdm(total=total, desc=desc, unit="sample", leave=False, disable=not progress)
    parts, widest = [], 0
    gsum = torch.zeros(obj.dim, dtype=torch.float64)
    with bar:
        for batch in quiet.batches():
            pieces = []
            for chunk in _chunks(batch, rows):
                c = batch_gradients(obj, chunk)
                pieces.append(SampleGradients(reduce(c.grads), c.weights, c.losses))
                gsum += c.grads.sum(0).double().cpu()
                widest = max(widest, c.grads.shape[0])
                bar.update(c.grads.shape[0])
            parts.append(_cat(pieces))
    return in_order(obj, parts), gsum, widest


def _chunks(batch: Any, rows: int | None) -> Iterator[Any]:
    n = samples_in(batch, "influence")
    if rows is None or rows >= n:
        yield batch
        return
    for s in range(0, n, rows):
        yield rows_of(batch, slice(s, min(s + rows, n)))


def _cat(pieces: list[SampleGradients]) -> SampleGradients:
    if len(pieces) == 1:
        return pieces[0]
    return SampleGradients(
        torch.cat([p.grads for p in pieces]),
        torch.cat([p.weights for p in pieces]),
        torch.cat([p.losses for p in pieces]),
    )


def low_rank(X: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    r"""The inverse products ``X`` ``(d, Q)`` at rank ``rank``, each query's column equally.

    With :math:`D = \operatorname{diag}(\|x_q\|)` and the truncated SVD of the normalized
    columns :math:`X D^{-1} \approx U_r S_r V_r^\top`,
    :math:`X \approx (U_r S_r)(V_r^\top D)`: the training pass multiplies each per-sample
    gradient by the ``(d, r)`` basis :math:`U_r S_r` and the ``(r, Q)`` result by
    :math:`V_r^\top D`, holding and multiplying ``r`` columns instead of ``Q``. Normalizing
    first makes the truncation minimize the sum of each query's RELATIVE squared error, so a
    query with a small gradient is not sacrificed to one with a large gradient (the LDS and
    rankings are per query and blind to its scale).

    Args:
        X: ``(d, Q)`` inverse products, one column per query.
        rank: The rank ``r`` kept (None: no compression).

    Returns:
        ``(basis (d, r), coefficients (r, Q) or None, error)``: ``error`` is the
        root-mean-square over all ``Q`` queries of :math:`\|x_q - \hat x_q\| / \|x_q\|`
        (0 for a zero column: a query without a counted token). ``rank`` None:
        ``(X, None, 0.0)``, the products as they are. A rank above ``Q`` is taken as ``Q``
        (the factorization is then exact up to rounding).

    Raises:
        ValueError: ``rank < 1``.
    """
    if rank is None:
        return X, None, 0.0
    if rank < 1:
        raise ValueError(f"influence: query_rank must be >= 1 (or None), got {rank}.")
    rank = min(rank, X.shape[1])
    norms = X.double().norm(dim=0).clamp_min(1e-300)
    U, S, Vh = torch.linalg.svd(X.double() / norms, full_matrices=False)
    # each column's squared relative error is sum_{j >= r} (S_j V_jq)^2; a zero column has
    # none, and counts as exact (||S_{r:}|| / ||S|| would average over nonzero columns only)
    error = float((S[rank:, None] * Vh[rank:]).pow(2).sum(0).mean().sqrt())
    return (U[:, :rank] * S[:rank]).to(X.dtype), (Vh[:rank] * norms).to(X.dtype), error
