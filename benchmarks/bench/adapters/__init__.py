"""One adapter per tool, all with the same small interface (:class:`Adapter`).

Each adapter wraps one tool's own operator and algorithms; the runner never calls a tool
directly. Every adapter counts the Hessian-vector products it spends (``hvps``, in
columns: a block of k vectors counts k), because the HVP is the unit of cost.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import torch

from bench.workloads import Workload


@dataclass(frozen=True)
class Setting:
    """One way to call a tool's solver: a label for the tables and its keyword arguments."""

    label: str
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Spectrum:
    """An SLQ result as a discrete measure: nodes and weights, one row per probe."""

    nodes: np.ndarray
    weights: np.ndarray


class Adapter(ABC):
    """The benchmark's view of a tool: one operator over a workload and its algorithms.

    Args:
        w: the workload (model in eval mode, list of batches, loss module).
    """

    name: str = ""
    #: Whether the ladder holds settings looser than the default (then it is searched even
    #: when the default already reaches the target, for the cheapest setting that does).
    ladder_loosens: bool = False

    def __init__(self, w: Workload):
        self.w = w
        self.hvps = 0

    def _count_calls(self, obj: object, attr: str) -> None:
        """Wrap the method ``obj.attr`` (one HVP per call) so that each call adds to ``hvps``."""
        inner = getattr(obj, attr)

        def counted(*args, **kwargs):
            self.hvps += 1
            return inner(*args, **kwargs)

        setattr(obj, attr, counted)

    @abstractmethod
    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """One full-data Hessian-vector product; ``v`` and the result are flat (d,)."""

    @abstractmethod
    def eig_settings(self, k: int) -> list[Setting]:
        """The tool's documented default first, then a ladder from loose to tight."""

    @abstractmethod
    def top_eigs(self, k: int, setting: Setting) -> np.ndarray:
        """The k largest eigenvalues, descending."""

    @abstractmethod
    def trace(self, budget: int, seed: int) -> tuple[float, tuple[float, float] | None]:
        """The tool's default trace estimator with ``budget`` HVPs, and its 95% CI if any."""

    def hutchinson(self, budget: int, seed: int) -> float:
        """Plain Hutchinson with ``budget`` Rademacher probes (None where the tool has none)."""
        raise NotImplementedError

    @abstractmethod
    def density(self, seed: int) -> Spectrum:
        """The tool's SLQ spectral density as nodes and weights."""

    @abstractmethod
    def layer_traces(self, budget: int, seed: int) -> dict[str, float]:
        """Trace of every module's diagonal Hessian block, ``budget`` HVPs per block."""


def split_like(v: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """A flat vector cut into tensors shaped like ``params``."""
    sizes = [p.numel() for p in params]
    return [c.reshape(p.shape) for c, p in zip(v.split(sizes), params, strict=True)]


def flatten(tensors) -> torch.Tensor:
    """Tensors joined into one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters with ``requires_grad``, in ``named_parameters`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def only_layer(model: torch.nn.Module, layer: str) -> list[torch.nn.Parameter]:
    """Freeze every parameter outside ``layer``; returns the previously trainable ones."""
    before = trainable(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name.rpartition(".")[0] == layer)
    return before


def unfreeze(params: list[torch.nn.Parameter]) -> None:
    """Undo :func:`only_layer`."""
    for p in params:
        p.requires_grad_(True)
