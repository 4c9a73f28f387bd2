"""Bisection on the measured metric along the Hessian frontier of bit allocations."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..problem.objective import Objective
from .allocate import Allocation, FrontierPoint, allocate, frontier
from .quantize import quantize
from .quantizer import Quantizer
from .sensitivity import Sensitivity, sensitivity

Metric = Callable[[nn.Module], float]


@dataclass(frozen=True)
class SearchResult:
    """The cheapest configuration on the Hessian path whose measured metric is within tolerance.

    Attributes:
        bits: ``{layer: bits}`` chosen.
        cost: Its cost (bytes or bit-operations, as ``allocate``'s ``cost``).
        predicted: Its predicted Ω.
        metric: Its measured metric.
        baseline: The metric of the unquantized model.
        target: ``baseline + tolerance``.
        met: Whether ``metric <= target`` (False: even the configuration at the budget misses
            the target, and that one is returned).
        evaluations: ``(cost, predicted, metric)`` of every configuration measured, in order.
        start: The Ω-optimal allocation at the budget, where the search starts.
        path: The frontier searched: Ω-optimal configurations, cost ascending.
    """

    bits: dict[str, int]
    cost: float
    predicted: float
    metric: float
    baseline: float
    target: float
    met: bool
    evaluations: tuple[tuple[float, float, float], ...]
    start: Allocation
    path: tuple[FrontierPoint, ...]


def search(
    obj: Objective,
    metric: Metric | None = None,
    *,
    budget: float | None = None,
    tolerance: float = 0.01,
    sens: Sensitivity | None = None,
    bits: Sequence[int] = (2, 3, 4, 8),
    cost: str = "size",
    quantizer: Quantizer | None = None,
    points: int = 24,
) -> SearchResult:
    r"""The cheapest allocation on the Hessian frontier that the measured metric accepts.

    Hessian sensitivities rank configurations but miss interactions between layers
    (Schaefer et al. 2023, "Augmenting Hessians with inter-layer dependencies for
    mixed-precision post-training quantization"), so the decision is left to a measurement:
    the Ω-optimal allocations of :func:`allocate` at ``points`` budgets from the cheapest
    configuration up to ``budget`` form a path (their Pareto set, ordered by cost), and a
    bisection finds the cheapest whose metric is at most ``baseline + tolerance``. It starts
    from the allocation at ``budget`` and measures about :math:`\log_2` of the number of path
    points; it assumes the metric grows as the cost falls along the path (where it does not,
    the answer is a configuration that meets the target, not necessarily the cheapest one).

    Args:
        obj: The loss, model and data (the data the default metric is measured on).
        metric: ``metric(model) -> float``, lower is better (e.g. a held-out loss or the error
            rate); default: the loss of ``obj`` on its data at the quantized weights.
        budget: Most cost allowed (default: every layer at the highest width).
        tolerance: Allowed rise of the metric over the unquantized model's.
        sens: Sensitivities (default: ``sensitivity(obj, bits, quantizer=quantizer)``).
        bits: Widths to choose from.
        cost: ``"size"`` or ``"bops"``.
        quantizer: The grid (default ``Quantizer()``, or ``sens.quantizer``).
        points: Budgets swept for the path.

    Returns:
        SearchResult.

    Raises:
        ValueError: as :func:`allocate` (e.g. a budget below the cheapest configuration).
    """
    if sens is None:
        sens = sensitivity(obj, bits, quantizer=quantizer)
    elif quantizer is not None and quantizer != sens.quantizer:
        raise ValueError(
            f"search: quantizer={quantizer} differs from the one the sensitivity was measured "
            f"with ({sens.quantizer}); pass one of them, or measure sens with this quantizer."
        )
    quantizer = quantizer or sens.quantizer
    metric = metric or objective_loss(obj)
    if budget is None:
        budget = _total(sens, max(bits), cost)
    start = allocate(sens, budget, cost=cost, bits=bits, frontier=0)
    path = list(frontier(sens, budget, cost=cost, bits=bits, points=points))
    baseline = metric(obj.model)
    target = baseline + tolerance
    seen: dict[int, float] = {}

    def measure(i: int) -> float:
        if i not in seen:
            seen[i] = metric(quantize(obj.model, path[i].bits, quantizer))
        return seen[i]

    lo, hi = 0, len(path) - 1
    met = measure(hi) <= target
    while met and lo < hi:
        mid = (lo + hi) // 2
        if measure(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    chosen = path[hi]
    evaluations = tuple((path[i].cost, path[i].predicted, v) for i, v in seen.items())
    return SearchResult(
        chosen.bits, chosen.cost, chosen.predicted, measure(hi), baseline, target, met,
        evaluations, start, tuple(path),
    )  # fmt: skip


def objective_loss(obj: Objective) -> Metric:
    """``metric(model)``: the loss of ``obj`` on its data with ``model``'s weights."""

    def loss(model: nn.Module) -> float:
        weights = dict(model.named_parameters())
        params = {n: weights[n].detach().to(device=obj.device, dtype=obj.dtype) for n in obj.params}
        with torch.no_grad():
            return float(obj.accumulate(lambda i, batch: obj.batch_loss(params, batch)))

    return loss


def _total(sens: Sensitivity, b: int, cost: str) -> float:
    """The cost of every layer at width ``b`` (activations at ``allocate``'s default 8 bits)."""
    if cost == "size":
        return sum(r.n_params * b / 8 for r in sens.layers)
    return sum(r.macs * b * 8 for r in sens.layers)
