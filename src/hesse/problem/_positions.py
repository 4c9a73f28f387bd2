"""The data of an objective: its batches, their shards across processes, and sample positions.

Under ``torch.distributed`` each process passes its own shard; a sample's global position is
where it stands in the data of all processes taken in rank order, so that draws keyed on it
(the Monte-Carlo Fisher) are the same on 1 and on N processes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sized
from typing import Any, cast

import torch
import torch.distributed as dist
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

_SHUFFLING = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)


def as_batches(data: Any, *, has_loss_fn: bool) -> Iterable[Any]:
    """A re-iterable collection of batches from a loader, a list of batches, or one batch.

    A pair ``(inputs, targets)`` is one batch, except with ``loss_fn=``, whose batches may
    be anything: the pair is then a list of two batches.
    """
    if (is_batch(data) and not has_loss_fn) or isinstance(data, (Mapping, torch.Tensor)):
        return [data]
    if isinstance(data, Iterator):
        raise ValueError(
            "Objective: data is a one-shot iterator (e.g. a generator), but every analysis "
            "passes over the data many times; pass a list of batches or a DataLoader."
        )
    if not isinstance(data, Iterable):
        raise ValueError(
            f"Objective: data must be a DataLoader, a list of batches or one batch; "
            f"got {type(data).__name__}."
        )
    return data


def is_batch(obj: object) -> bool:
    """Whether ``obj`` is one batch: a dict, or ``(inputs, targets)`` with tensor targets.

    Example:
        >>> x, y = torch.zeros(4, 3), torch.zeros(4)
        >>> is_batch((x, y)), is_batch([(x, y), (x, y)]), is_batch({"input_ids": x})
        (True, False, True)
    """
    if isinstance(obj, Mapping):
        return True
    return (
        isinstance(obj, (tuple, list))
        and len(obj) == 2
        and isinstance(obj[0], (torch.Tensor, Mapping))
        and isinstance(obj[1], torch.Tensor)
    )


def distributed() -> bool:
    """Whether sums must be all-reduced across processes (``torch.distributed`` is running)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce(
    total: torch.Tensor, weight: float, failed: bool
) -> tuple[torch.Tensor, float, bool]:
    """A sum, its weight and a failure flag over all processes (as they are on one process).

    The failure flag travels with the sums so that every rank learns of a failure elsewhere
    and raises, instead of waiting forever in the next collective.
    """
    if not distributed():
        return total, weight, failed
    # the weight is reduced in float64: exact counts even for a float32 model
    flags = total.new_tensor([weight, failed], dtype=torch.float64)
    buf = torch.cat([total.reshape(-1).double(), flags])
    dist.all_reduce(buf)
    return buf[:-2].reshape(total.shape).to(total.dtype), float(buf[-2]), bool(buf[-1])


def weighted_mean(terms: Iterable[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """``sum_b term_b / sum_b w_b`` over the ``(term, weight)`` pairs of all processes.

    Raises:
        ValueError: a term is not finite (the message names its batch, on every rank), no
            batch on this process, or a total weight of 0 (every label ignored).
    """
    total, weight, bad = summed(terms)
    total, weight, failed = all_reduce(total, weight, bad is not None)
    return checked_mean(total, weight, failed, bad)


def summed(terms: Iterable[tuple[torch.Tensor, float]]) -> tuple[torch.Tensor, float, int | None]:
    """``(sum_b term_b, sum_b w_b, first non-finite batch or None)`` on this process.

    Raises:
        ValueError: no batch on this process.
    """
    total, weight, bad = None, 0.0, None
    for i, (term, w) in enumerate(terms):
        if bad is None and not torch.isfinite(term).all():
            bad = i  # raised after the reduction, so that no other rank waits forever
        total = term if total is None else total + term
        weight += float(w)
    if total is None:
        raise ValueError("Objective: the data yielded no batches on this process.")
    return total, weight, bad


def checked_mean(total: torch.Tensor, weight: float, failed: bool, bad: int | None) -> torch.Tensor:
    """``total / weight`` of reduced sums, refusing a non-finite term or a total weight of 0.

    Raises:
        ValueError: ``failed`` (naming batch ``bad`` when it is this process's), or
            ``weight == 0`` (every label ignored).
    """
    if failed:
        where = f"batch {bad}" if bad is not None else "a batch of another process"
        raise ValueError(
            f"Objective: non-finite loss or derivative in {where}; check that batch's "
            "inputs and targets, and the numerical range of the loss."
        )
    if weight == 0:
        raise ValueError(
            "Objective: the data has total weight 0: every label is ignored (equal to the "
            "loss's ignore_index, -100 by default) or has class weight 0, so the mean loss is "
            "over no sample; check the labels (is everything marked as padding?)."
        )
    return total / weight


def check_shards(empty: bool, data: Iterable, device: torch.device) -> int | None:
    """Refuse empty or padded data on any process (all ranks alike); return the shard's offset.

    Args:
        empty: This process's data yielded no batch.
        data: This process's data (to count its samples).
        device: Where the collective runs.

    Returns:
        The shard offset: the number of samples that processes of lower rank hold (0 on one
        process), or None when one of them cannot count its samples.

    Raises:
        ValueError: the data of some process is empty, raised on every process; or this
            process's loader has a ``DistributedSampler`` that pads the data.
    """
    _check_padding(data)
    if not distributed():
        if empty:
            raise ValueError(
                "Objective: the data is empty (it yielded no batch); pass a DataLoader or a "
                "non-empty list of batches."
            )
        return 0
    rank, world = dist.get_rank(), dist.get_world_size()
    buf = torch.zeros(2 * world, dtype=torch.int64, device=device)
    buf[2 * rank], buf[2 * rank + 1] = int(empty), _local_count(data)
    dist.all_reduce(buf)  # every rank learns every shard's state, so all raise alike
    flags, counts = buf[0::2].tolist(), buf[1::2].tolist()
    if any(flags):
        empties = [r for r, f in enumerate(flags) if f]
        raise ValueError(
            f"Objective: the data shard of process(es) {empties} of {world} is empty (no "
            "batch); under torch.distributed every process needs at least one batch. Split the "
            "data so that every rank gets some (e.g. DistributedSampler)."
        )
    return None if min(counts[:rank], default=0) < 0 else sum(counts[:rank])


def positions(data: Iterable, offset: int | None) -> list[torch.Tensor]:
    """Global sample positions of every batch of this process (``Objective.sample_positions``).

    Args:
        data: This process's data: a ``DataLoader`` or a list of batches.
        offset: The shard offset (samples of lower ranks) from :func:`check_shards`.

    Returns:
        One ``(n_b,)`` int64 tensor per batch.

    Raises:
        ValueError: a batch holds no tensor to count, the loader shuffles or has no batch
            sampler, or a lower rank's sample count is unknown.
    """
    if offset is None:
        raise ValueError(
            "Objective.sample_positions: a lower-ranked process's sample count is unknown (its "
            "data is not a list of batches or a DataLoader over a sized dataset), so this "
            "process cannot place its samples; pass lists or DataLoaders on every process."
        )
    if isinstance(data, DataLoader):
        batches = _loader_indices(data)
    else:
        batches, start = [], 0
        for i, batch in enumerate(data):
            n = sample_count(batch)
            if n is None:
                raise ValueError(
                    f"Objective.sample_positions: batch {i} holds no tensor to count its samples "
                    "by (dim 0); pass tensors, or a DataLoader over a map-style dataset."
                )
            batches.append(torch.arange(start, start + n))
            start += n
    return [b + offset for b in batches]


def _check_padding(data: Iterable) -> None:
    """Refuse a ``DistributedSampler`` that repeats samples to fill its last round."""
    sampler = data.sampler if isinstance(data, DataLoader) else None
    if not isinstance(sampler, DistributedSampler):
        return
    n = len(cast(Sized, sampler.dataset))  # DistributedSampler takes its len() when built
    if sampler.total_size > n:
        raise ValueError(
            f"Objective: the DistributedSampler pads {n} samples to {sampler.total_size} "
            f"({sampler.num_replicas} processes of {sampler.num_samples}) by repeating the first "
            f"{sampler.total_size - n}, which the mean loss would count twice; make the number "
            "of samples divisible by the world size, or pass drop_last=True to the "
            "DistributedSampler."
        )


def sample_count(batch: Any) -> int | None:
    """Samples in a batch: dim 0 of its first tensor (None when it holds none).

    Example:
        >>> sample_count(({"input_ids": torch.zeros(3, 7)}, torch.zeros(3)))
        3
    """
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    items = batch.values() if isinstance(batch, Mapping) else batch
    if not isinstance(batch, (Mapping, list, tuple)):
        return None
    return next((n for n in map(sample_count, items) if n is not None), None)


def samples_in(batch: Any, who: str) -> int:
    """:func:`sample_count`, refusing a batch without a tensor (the error starts with ``who``)."""
    n = sample_count(batch)
    if n is None:
        raise ValueError(
            f"{who}: a batch holds no tensor to count its samples by (dim 0); pass batches of "
            "tensors, or tuples, lists or dicts of them."
        )
    return n


def rows_of(batch: Any, index: slice | torch.Tensor) -> Any:
    """The samples ``index`` (a slice or an index tensor of dim 0) of every tensor of a batch.

    Example:
        >>> rows_of({"x": torch.arange(4), "n": 2}, slice(1, 3))
        {'x': tensor([1, 2]), 'n': 2}
    """
    if isinstance(batch, torch.Tensor):
        return batch[index if isinstance(index, slice) else index.to(batch.device)]
    if isinstance(batch, Mapping):
        return {key: rows_of(value, index) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(rows_of(value, index) for value in batch)
    return batch


def _local_count(data: Iterable) -> int:
    """Samples this process holds, by which higher ranks' positions are offset (-1: unknown)."""
    if isinstance(data, DataLoader):
        if isinstance(data.sampler, DistributedSampler):
            return 0  # its dataset indices are global already
        dataset = data.dataset
        try:
            return len(dataset) if isinstance(dataset, Sized) else -1
        except TypeError:  # a __len__ that refuses, as an iterable dataset's may
            return -1
    if not isinstance(data, (list, tuple)):
        return -1
    counts = [n for n in map(sample_count, data) if n is not None]
    return sum(counts) if len(counts) == len(data) else -1


def _loader_indices(loader: DataLoader) -> list[torch.Tensor]:
    """The dataset indices of each batch of a loader whose order is the same on every pass."""
    sampler = loader.batch_sampler
    if sampler is None or isinstance(loader.dataset, IterableDataset):
        raise ValueError(
            "Objective.sample_positions: the DataLoader has no batch sampler (an iterable "
            "dataset, or batch_size=None), so its samples have no positions; use a map-style "
            "dataset with batch_size set, or a list of batches."
        )
    inner = sampler.sampler if isinstance(sampler, BatchSampler) else sampler
    shuffles = isinstance(inner, _SHUFFLING) or (
        isinstance(inner, DistributedSampler) and inner.shuffle
    )
    first = None if shuffles else [list(b) for b in sampler]
    if shuffles or first != [list(b) for b in sampler]:
        raise ValueError(
            f"Objective.sample_positions: the DataLoader's sampler ({type(inner).__name__}) "
            "shuffles, so the samples of a batch change from pass to pass and draws keyed on "
            "them would change the matrix on every product; build the loader with "
            "shuffle=False (DistributedSampler(..., shuffle=False) under torch.distributed). "
            "The mean loss and its curvature do not depend on the order."
        )
    return [torch.as_tensor(b, dtype=torch.long) for b in first]
