"""The result of :func:`hesse.prune.prune`: masks, updated weights, removed units."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ._units import Unit, shrink


@dataclass(frozen=True)
class Calibration:
    """How the layer inputs were gathered, and the memory that took.

    Attributes:
        sequential: Whether each block's inputs came through the blocks already pruned.
        pieces: Calibration passes: one per transformer block that holds pruned weights, plus
            one for the weights outside the blocks (if any).
        planned_bytes: ``peak_bytes`` as predicted once the first block's inputs are captured
            (before any Hessian is formed): their bytes, one more hidden state per sample
            (the outputs), and the largest block's Hessians; exact when every block maps
            hidden states to hidden states of the same shape.
        peak_bytes: Largest calibration state held at once: one block's stored inputs and
            outputs (every calibration sample) plus its layers' ``(in, in)`` float64 Hessians;
            the model itself not included.
        rss_bytes: The process's peak resident memory after the run (``ru_maxrss``), the model,
            Python and everything before included.
    """

    sequential: bool
    pieces: int
    planned_bytes: int
    peak_bytes: int
    rss_bytes: int


@dataclass(frozen=True)
class PrunePlan:
    """What :func:`prune` decided; :meth:`apply` makes the pruned model.

    Attributes:
        weights: New values of the pruned parameters (OBS updates included, zeros where
            pruned), ``{name: tensor}``; empty for structured pruning.
        masks: ``{name: bool tensor}``, True where a weight is kept.
        units: Heads or neurons removed (structured pruning), else ``()``.
        method: The saliency method.
        structure: ``"unstructured"``, ``"n:m"``, ``"heads"`` or ``"channels"``.
        scope: ``"global"`` (one ranking over all layers) or ``"layer"`` (each layer alike).
        sparsity: The fraction asked for (of weights, or of units when structured).
        curvature: ``"fisher"``, ``"ggn"``, ``"hessian"``, ``"kfac"`` or ``"ekfac"``; None when
            no curvature is read.
        damping: Absolute damping of each step (empty when no curvature is read).
        relative_damping: Damping relative to the mean curvature diagonal, as used per step.
        predicted: Predicted loss increase of each OBS step (empty for other methods).
        skipped: Parameters left dense (an ``n:m`` pattern does not divide their rows).
        removed_params: Parameters zeroed, or removed with their units.
        total_params: Parameters of the pruned tensors (the model's, when structured).
        calibration: How ``"sparsegpt"`` gathered its layer inputs and the memory it held
            (:class:`Calibration`); None for the other methods.
    """

    weights: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    units: tuple[Unit, ...]
    method: str
    structure: str
    scope: str
    sparsity: float
    curvature: str | None
    damping: tuple[float, ...]
    relative_damping: tuple[float, ...]
    predicted: tuple[float, ...]
    skipped: tuple[str, ...]
    removed_params: int
    total_params: int
    calibration: Calibration | None = None

    def apply(self, model: nn.Module) -> nn.Module:
        """A pruned deep copy of ``model`` (which is left untouched).

        Unstructured and ``n:m``: the copy's pruned parameters get :attr:`weights`. Heads and
        channels: the copy really loses them (smaller tensors, fewer heads), so saving it
        (``torch.save(model)``) stores fewer parameters.
        """
        pruned = copy.deepcopy(model)
        named = dict(pruned.named_parameters())
        with torch.no_grad():
            for name, value in self.weights.items():
                named[name].copy_(value.to(named[name]))
        if self.units:
            shrink(pruned, list(self.units))
        return pruned
