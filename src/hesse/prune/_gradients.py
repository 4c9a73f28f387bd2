"""Per-sample (or mini-batch) gradients of an objective: the rows of the empirical Fisher."""

from __future__ import annotations

import copy

import torch

from ..problem._per_sample import batch_gradients
from ..problem._positions import rows_of, samples_in
from ..problem.objective import Objective

AUTO_M = 256
"""Gradients of the empirical Fisher by default (M-FAC's and WoodFisher's usual window)."""


def collect_gradients(
    obj: Objective, m: int | str | None = "auto", *, batch_size: int = 1, seed: int = 0
) -> torch.Tensor:
    r"""Gradients of the mean loss of ``m`` chunks of ``batch_size`` samples, stacked as rows.

    The rows :math:`g_i` define the empirical Fisher
    :math:`F = \frac1m \sum_i g_i g_i^\top = G^\top G / m` that M-FAC, WoodFisher and OBD use
    (Frantar, Kurtic & Alistarh 2021, "M-FAC: Efficient Matrix-Free Approximations of
    Second-Order Information"). Each batch of the data is cut into chunks of ``batch_size``
    samples along dim 0; ``m`` of all chunks are drawn without replacement (seeded) and kept in
    data order. A chunk's gradient is that of its own mean loss (samples, or tokens for a
    token-weighted ``loss_fn``); a chunk whose labels are all ignored gives a zero row. Per-sample
    gradients (``batch_size=1``) take one ``torch.func.vmap`` of ``grad`` per batch where it
    runs the model (``hesse.problem._per_sample``), chunks one backward pass each.

    Args:
        obj: The objective; its analysed parameters are the columns.
        m: Number of gradients; ``"auto"`` takes ``AUTO_M`` (256), or every chunk when the
            data holds fewer; None takes every chunk.
        batch_size: Samples per chunk (1: per-sample gradients).
        seed: Seed of the draw of chunks when ``m`` is smaller than their number.

    Returns:
        ``(m, d)`` tensor of ``obj.dtype``, columns in the layout of ``obj.space``.

    Raises:
        ValueError: ``m`` or ``batch_size`` below 1, or ``m`` larger than the number of chunks
            the data holds (the message gives that number).

    Example:
        >>> x, y = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])
        >>> obj = Objective(torch.nn.Linear(3, 2), [(x, y)], loss=torch.nn.functional.cross_entropy)
        >>> G = collect_gradients(obj, m=None)
        >>> tuple(G.shape), bool(torch.allclose(G.mean(0), obj.gradient(), atol=1e-6))
        ((6, 8), True)
    """
    if (
        batch_size < 1
        or (isinstance(m, int) and m < 1)
        or (m is not None and m != "auto" and not isinstance(m, int))
    ):
        raise ValueError(
            f"collect_gradients: m must be 'auto', None or >= 1 and batch_size >= 1, got "
            f"m={m!r}, batch_size={batch_size}."
        )
    sizes = [samples_in(b, "collect_gradients") for b in obj.batches()]
    n_chunks = sum(-(-n // batch_size) for n in sizes)
    if isinstance(m, str):  # "auto", as checked above
        m = min(AUTO_M, n_chunks)
    if m is not None and m > n_chunks:
        raise ValueError(
            f"collect_gradients: m={m} gradients asked for, but the data holds only "
            f"{sum(sizes)} samples, i.e. {n_chunks} chunks of batch_size={batch_size}; pass "
            f"m <= {n_chunks} (or a smaller batch_size, or more data)."
        )
    wanted = _drawn(n_chunks, m, seed)
    rows, first = [], 0  # first: the number of the batch's first chunk
    for batch, n in zip(obj.batches(), sizes, strict=True):
        count = -(-n // batch_size)
        picked = [c - first for c in range(first, first + count) if c in wanted]
        first += count
        if picked:
            index = _samples_of(picked, n, batch_size)
            rows.append(batch_gradients(obj, rows_of(batch, index), size=batch_size).means())
    return torch.cat(rows)


def _samples_of(chunks: list[int], n: int, size: int) -> torch.Tensor:
    """The samples of some chunks (numbered within their batch of ``n``), in order.

    Only a batch's last chunk can be short, and it stays last: these samples, cut again into
    chunks of ``size``, are those chunks.
    """
    return torch.cat([torch.arange(c * size, min(n, (c + 1) * size)) for c in chunks])


def objective_at(obj: Objective, params: dict[str, torch.Tensor]) -> Objective:
    """The same objective with the analysed parameters set to ``params`` (a shallow copy).

    Gradual pruning evaluates the curvature again at the pruned weights; ``Objective`` keeps
    its parameters in ``params``, as ``Objective.restrict`` does for a subset.
    """
    moved = copy.copy(obj)
    moved.params = {n: params[n].to(obj.params[n]) for n in obj.params}
    return moved


def _drawn(n: int, m: int | None, seed: int) -> set[int]:
    if m is None or m == n:
        return set(range(n))
    gen = torch.Generator().manual_seed(seed)
    return set(torch.randperm(n, generator=gen)[:m].tolist())
