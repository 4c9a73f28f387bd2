"""Per-batch states a curvature operator keeps between products while they fit a memory cap."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from ._memory import available_bytes, format_bytes, storages

AUTO_CACHE_FRACTION = 0.5
"""Share of the free memory that ``max_cache_bytes="auto"`` lets the kept graphs take."""


class KeptStates:
    """The states of all batches, built and measured on a first pass, kept while they fit.

    During a pass opened with :meth:`first_pass`, the operator measures each batch's state as
    it builds it and adds it to ``build``. When the pass ends the states are kept if their
    bytes total at most the cap; otherwise they are dropped, a warning says so once, and later
    passes build the states without measuring them. Kept states go stale when an in-place
    version counter of the tensors they were built from moves.

    Args:
        owner: The operator's name, for the warning.
        setting: ``max_cache_bytes``: bytes, ``0`` (keep none) or ``"auto"``
            (``AUTO_CACHE_FRACTION`` of the memory free on ``device`` when a pass starts).
        device: Where the states live.
        tensors: The parameters and buffers the states are built from.
        enabled: Whether a first pass measures and keeps its states.

    Attributes:
        states: The kept states in batch order, or None.
        nbytes: Bytes the kept states hold (0 when none are kept).
        build: The first pass in progress, or None (no pass, or one that does not measure).
    """

    def __init__(
        self,
        owner: str,
        setting: int | str,
        device: torch.device,
        tensors: Sequence[torch.Tensor],
        *,
        enabled: bool,
    ):
        self.owner, self.setting, self.device, self.tensors = owner, setting, device, tensors
        self.enabled, self.warned = enabled, False
        self.states: list | None = None
        self.nbytes = 0
        self.versions: list[int] | None = None
        self.build: _FirstPass | None = None

    def fresh(self) -> bool:
        """Whether states are kept and the tensors they were built from are unchanged."""
        return self.states is not None and self.versions == self._versions()

    def clear(self) -> None:
        """Drop the kept states."""
        self.states, self.nbytes, self.versions = None, 0, None

    def emptied(self, tensors: Sequence[torch.Tensor], *, enabled: bool) -> KeptStates:
        """An empty copy for states built from other ``tensors`` (a once-given warning holds)."""
        new = copy.copy(self)
        new.tensors, new.enabled, new.build = tensors, enabled, None
        new.clear()
        return new

    def resident(self) -> set[int]:
        """Storages of the tensors the states are built from: not counted in their bytes."""
        return storages(self.tensors)

    @contextmanager
    def first_pass(self) -> Iterator[None]:
        """A pass that builds every batch's state anew; keeps them at its end if they fit."""
        self.clear()
        self.build = _FirstPass(self._cap(), self.resident()) if self.enabled else None
        try:
            yield
            self._keep()
        finally:
            self.build = None

    def _cap(self) -> int:
        if isinstance(self.setting, str):  # "auto", the only string the operators accept
            return int(AUTO_CACHE_FRACTION * available_bytes(self.device))
        return self.setting

    def _versions(self) -> list[int]:
        return [t._version for t in self.tensors]

    def _keep(self) -> None:
        """Keep the states of a finished first pass, or say once why they were not kept."""
        build = self.build
        if build is None:
            return
        if build.states is not None:
            self.states, self.nbytes, self.versions = build.states, build.nbytes, self._versions()
            return
        self.enabled = False  # later passes recompute without measuring
        if not self.warned:
            self.warned = True
            warnings.warn(self._warning(build), stacklevel=4)

    def _warning(self, build: _FirstPass) -> str:
        cap = f"{format_bytes(build.cap)} (max_cache_bytes={self.setting!r}"
        if self.setting == "auto":
            cap += f": {AUTO_CACHE_FRACTION:.0%} of the free memory"
        return (
            f"{self.owner}: the per-batch graphs of the data need {format_bytes(build.nbytes)} "
            f"for {build.count} batches, more than the cache cap of {cap}); they are not kept, so "
            "every product recomputes them (about 3x the time of a cached product). If that much "
            f"memory is free, pass max_cache_bytes={int(1.1 * build.nbytes)}; or analyse fewer "
            "parameters (params=) or samples."
        )


class _FirstPass:
    """The states of a first pass, kept while their bytes fit ``cap``, and their total."""

    def __init__(self, cap: int, resident: set[int]):
        self.cap, self.resident = cap, resident
        self.states: list | None = []
        self.nbytes, self.count = 0, 0

    def add(self, state, nbytes: int) -> None:
        self.nbytes, self.count = self.nbytes + nbytes, self.count + 1
        if self.states is not None and self.nbytes <= self.cap:
            self.states.append(state)
        else:  # over the cap: drop what was kept, go on measuring for the warning
            self.states = None
