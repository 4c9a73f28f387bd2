"""The base of the curvature operators of an Objective: one data pass per product, kept states."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..problem.objective import Batch, Objective
from ._autograd import (
    Tangents,
    check_twice_differentiable,
    leaf_params,
    second_order,
)
from ._cache import KeptStates
from ._memory import saved_bytes, storages
from .base import Operator, copy_with


class ModelOperator(Operator):
    """An operator defined by one product per batch, summed exactly over the data.

    Subclasses implement ``_graph(batch)``, the autograd graphs a product needs on one batch
    (a gradient graph, a linearization), optionally ``_state(index, batch, graph)`` to add what
    else it needs, and ``_apply(state, V) -> ((k, *shape) per parameter, w_b)``, the batch's
    weighted (sum-form) product. This class splits and joins flat vectors, chunks wide
    ``V`` into ``block_size`` columns per batch (one data pass for all of them), divides by the
    total weight, and keeps the states of all batches between products while their saved
    tensors total at most ``max_cache_bytes`` (dropped when the parameters change in place).
    Every pass runs ``scaled_dot_product_attention`` on its math kernel, the one with a double
    backward and a forward-mode derivative.

    Args:
        objective: The loss, model and data.
        tags: Declared structure.
        block_size: Most columns pushed through the model at once (memory grows with it).
        max_cache_bytes: Memory cap of the kept states: bytes, ``0`` (keep none), or ``"auto"``
            (``AUTO_CACHE_FRACTION`` of the memory free on the device when they are built).

    Attributes:
        cache_bytes: Bytes the kept states hold (0 when none are kept).
    """

    _SHARES_LEAVES = False

    def __init__(self, objective: Objective, tags, block_size: int = 32, max_cache_bytes="auto"):
        if max_cache_bytes != "auto" and not (
            isinstance(max_cache_bytes, int) and max_cache_bytes >= 0
        ):
            raise ValueError(
                f"{type(self).__name__}: max_cache_bytes must be a number of bytes >= 0 or "
                f"'auto', got {max_cache_bytes!r}."
            )
        super().__init__(objective.dim, objective.dtype, objective.device, tags, objective.space)
        self.objective = objective
        self.block_size, self.max_cache_bytes = block_size, max_cache_bytes
        name, enabled = type(self).__name__, self._can_cache()
        self._kept = KeptStates(
            name, max_cache_bytes, self.device, _tensors(objective), enabled=enabled
        )
        self._checked = False
        self._leaves: Tangents | None = None  # a pass's shared leaves (see _sharing)
        self._last: tuple[Batch, Any] | None = None  # (batch, state) of the last batch built

    @property
    def cache_bytes(self) -> int:
        """Bytes the kept states hold (0 when none are kept)."""
        return self._kept.nbytes

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        shard, fresh = self.objective.shard, self._kept.fresh()
        # under FSDP every process takes the same path (the collectives inside must pair up)
        if shard is not None and not shard.all(fresh):
            fresh = False
        if fresh:
            return self._pass(
                V, lambda i, state, T, out: self._apply_into(state, T, out), self._kept.states
            )
        try:
            with self._kept.first_pass(), self._sharing():
                return self._pass(V, self._matmat_batch)
        finally:
            self._last = None

    @contextmanager
    def _sharing(self) -> Iterator[None]:
        """Under FSDP, one set of leaves for all batches of a pass, and one gathered copy.

        For operators whose graphs differentiate ``self._leaves`` (``_SHARES_LEAVES``): every
        batch's graph then reaches the same gathered weights, which kept graphs hold once.
        """
        gatherer = self.objective._gatherer
        if gatherer is None or not self._SHARES_LEAVES:
            yield
            return
        self._leaves = leaf_params(self.objective)
        try:
            with gatherer.sharing():
                yield
        finally:
            self._leaves = None

    def clear_cache(self) -> None:
        """Free the kept per-batch states (the next product rebuilds them)."""
        self._kept.clear()

    def _pass(self, V: torch.Tensor, product: Callable, items=None) -> torch.Tensor:
        """One pass over ``items`` (default: the batches) applying ``product`` per column chunk.

        ``product(index, item, T, out) -> w_b`` writes the chunk's weighted products into
        ``out`` (``(chunk, *shape)`` per parameter: views of one zeroed ``(k, d)`` buffer per
        batch, row ``j`` the product with column ``j``), so a batch's term is that buffer,
        transposed, with no joined or concatenated copies. The batches after the first share
        one buffer: ``Objective.accumulate`` adds each term into its total before it asks for
        the next one, so that a batch overwrites the previous term, not a third block (the
        first term becomes the total itself). The batch's state is dropped as soon as its
        chunks are done (kept states stay in the cache).

        Under FSDP the columns stay local shards: each unit gathers its rows of them inside the
        second backward (``hesse.problem._gather``), and the products come out local, summed.
        """
        space, size, (d, k) = self.objective.space, self.block_size, V.shape
        # contiguous copies of the columns, made once per pass: views of a solver's basis
        # (strided) would be gathered by every batch's backward, 10-25% slower per product
        chunks = [(i, space.split(V[:, i : i + size])) for i in range(0, k, size)]

        calls = [0]
        later: list[torch.Tensor] = []  # the terms' buffer after the first (that one: the total)

        def term(index: int, item) -> tuple[torch.Tensor, float]:
            calls[0] += 1
            if calls[0] == 1:  # becomes the total: never reused
                buffer = V.new_zeros(k, d)
            elif not later:
                buffer = V.new_zeros(k, d)
                later.append(buffer)
            else:
                buffer = later[0].zero_()
            w = 0.0
            try:
                with second_order(type(self).__name__):
                    for i, T in chunks:
                        w = product(index, item, T, _views(space, buffer[i : i + size]))
            finally:
                self._last = None  # free the batch's graphs before the terms are summed
            return buffer.T, w

        return self.objective.accumulate(term, items, shards=True)  # summed over processes

    def _matmat_batch(self, index: int, batch: Batch, V: Tangents, out: Tangents) -> float:
        return self._apply_into(self._state_of(index, batch), V, out)

    def _apply_into(self, state, V: Tangents, out: Tangents) -> float:
        """Write the batch's weighted product into ``out`` (zeros on entry); returns ``w_b``."""
        return copy_into(self._apply(state, V), out)

    # ------------------------------------------------------------------ what subclasses define
    def _graph(self, batch: Batch):
        """The autograd graphs of one batch (measured while caching)."""
        raise NotImplementedError

    def _state(self, index: int, batch: Batch, graph):
        """Everything a product on batch ``index`` needs, built from its graphs."""
        return graph

    def _apply(self, state, V: Tangents) -> tuple[Tangents, float]:
        """The batch's weighted product ``((k, *shape) per parameter, w_b)``."""
        raise NotImplementedError

    def _held_bytes(self, state) -> int:
        """Bytes a state holds outside its autograd graphs."""
        return 0

    def _can_cache(self) -> bool:
        return self.max_cache_bytes != 0

    # ------------------------------------------------------------------ per-batch states
    def _state_of(self, index: int, batch: Batch):
        """The batch's state: reused for its next chunk of columns, measured while caching."""
        if self._last is not None and self._last[0] is batch:
            return self._last[1]
        self._last = None  # free the previous batch's state before building this one
        build = self._kept.build
        if build is None:
            state = self._state(index, batch, self._graph(batch))
        else:
            state, size = self._measured_state(index, batch, build.resident)
            build.add(state, size)
            gatherer = self.objective._gatherer
            if gatherer is not None and gatherer.shared:  # counted once, by the first batch
                build.resident.update(
                    storages(t for _, full in gatherer.shared.values() for t in full)
                )
        self._last = (batch, state)
        return state

    def _measured_state(self, index: int, batch: Batch, resident: set[int]):
        """``(state, bytes)``: the state and the bytes it holds (what its graphs save, and more)."""
        graph, saved = saved_bytes(lambda: self._graph(batch), resident)
        state = self._state(index, batch, graph)  # torch.func refuses saved-tensor hooks
        return state, saved + self._held_bytes(state)

    def _measure_state(self, batch: Batch, resident: set[int] | None = None) -> int:
        """Bytes one batch's kept state takes (for the memory plan); nothing is kept.

        ``resident``: the storages not to count (default: the parameters and buffers).
        """
        resident = self._kept.resident() if resident is None else resident
        with second_order(type(self).__name__):
            return self._measured_state(0, batch, resident)[1]

    def _check_once(self, grads: Iterable[torch.Tensor]) -> None:
        """Check the first batch's backward graph for once-differentiable Functions."""
        if not self._checked:
            check_twice_differentiable(type(self).__name__, grads)
            self._checked = True

    def _restrict(self, names: list[str]) -> Operator:
        sub = self.objective.restrict(names)
        # the kept states differentiate all parameters, not the block's; and a block's graphs
        # may fit where the whole did not
        kept = self._kept.emptied(_tensors(sub), enabled=self._can_cache())
        return copy_with(self, objective=sub, space=sub.space, shape=(sub.dim, sub.dim), _kept=kept)


def copy_into(result: tuple[Tangents, float], out: Tangents) -> float:
    """Copy a product ``(per-parameter (k, *shape) tensors, w_b)`` into ``out``; returns ``w_b``."""
    values, w = result
    for name, value in values.items():
        out[name].copy_(value)
    return w


def _views(space, rows: torch.Tensor) -> Tangents:
    """Per-parameter ``(k, *shape)`` views of ``rows`` ``(k, d)`` (each row a flat vector)."""
    views, offset = {}, 0
    for name, numel, shape in zip(space.names, space.numels, space.shapes, strict=True):
        views[name] = rows[:, offset : offset + numel].view(rows.shape[0], *shape)
        offset += numel
    return views


def _tensors(objective: Objective) -> tuple[torch.Tensor, ...]:
    """The parameters and buffers that kept states are built from."""
    return (*objective.params.values(), *objective.frozen.values())
