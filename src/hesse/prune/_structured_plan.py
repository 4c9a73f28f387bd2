"""Structured pruning: remove whole heads or MLP neurons ranked by a group saliency."""

from __future__ import annotations

import torch

from ..linalg._util import generator
from ..problem.objective import Objective
from ._gradients import objective_at
from ._result import PrunePlan
from ._units import Unit, find_units, unit_index, unit_size
from .structured import expert_saliency, group_saliency

GROUP_METHODS = ("nvit", "heapr", "magnitude", "random")
SCOPES = ("global", "layer")


def prune_units(
    obj: Objective,
    fraction: float,
    method: str,
    structure: str,
    scope: str,
    recompute: int,
    m: int | str | None,
    batch_size: int,
    seed: int,
) -> PrunePlan:
    """Remove ``fraction`` of the heads or neurons; see :func:`hesse.prune.prune`.

    Each step zeroes the units removed so far in the weights it scores, so later steps rank
    the rest in the smaller model. Every module keeps at least one unit.
    """
    _check(method, structure, scope)
    units = find_units(obj.model, structure)
    index = [unit_index(obj.space, u) for u in units]
    w = obj.space.join(obj.params).detach().clone()
    removed: set[int] = set()
    for t in range(1, recompute + 1):
        at = objective_at(obj, obj.space.split(w))
        scores = _scores(at, units, index, w, method, m, batch_size, seed)
        removed = _choose(scores, units, removed, fraction * t / recompute, scope)
        for i in removed:
            w[index[i]] = 0
    gone = tuple(units[i] for i in sorted(removed))
    alive = torch.ones(w.shape[0], dtype=torch.bool)
    for i in removed:
        alive[index[i]] = False
    return PrunePlan(
        weights={},
        masks=obj.space.split(alive),
        units=gone,
        method=method,
        structure=structure,
        scope=scope,
        sparsity=fraction,
        curvature="fisher" if method in ("nvit", "heapr") else None,
        damping=(),
        relative_damping=(),
        predicted=(),
        skipped=(),
        removed_params=sum(unit_size(u, obj.model) for u in gone),
        total_params=sum(p.numel() for p in obj.model.parameters()),
    )


def _check(method: str, structure: str, scope: str) -> None:
    if method not in GROUP_METHODS or (method == "heapr" and structure != "channels"):
        raise ValueError(
            f"prune: method must be one of {GROUP_METHODS} for structure={structure!r} "
            f"('heapr' scores MLP neurons: structure='channels'), got {method!r}."
        )
    if scope not in SCOPES:
        raise ValueError(f"prune: scope must be one of {SCOPES}, got {scope!r}.")


def _scores(at, units, index, w, method, m, batch_size, seed) -> torch.Tensor:
    if method == "nvit":
        return group_saliency(at, units, m=m, batch_size=batch_size, seed=seed).scores
    if method == "heapr":
        got = expert_saliency(at)
        by_unit = dict(zip(got.units, got.scores.tolist(), strict=True))
        return torch.tensor([by_unit[u] for u in units], dtype=torch.float64)
    if method == "magnitude":
        return torch.stack([(w[i].to(torch.float64) ** 2).sum() for i in index])
    return torch.rand(len(units), generator=generator(seed), dtype=torch.float64)


def _choose(
    scores: torch.Tensor, units: list[Unit], removed: set[int], fraction: float, scope: str
) -> set[int]:
    """The removed units after this step: those removed before, then the least salient."""
    scores = scores.clone()
    scores[list(removed)] = -torch.inf
    modules: dict[str, list[int]] = {}
    for i, u in enumerate(units):
        modules.setdefault(u.module, []).append(i)
    for members in modules.values():  # every module keeps its best unit
        scores[max(members, key=lambda i: float(scores[i]))] = torch.inf
    if scope == "global":
        k = min(int(round(fraction * len(units))), len(units) - len(modules))
        return set(scores.argsort()[:k].tolist())
    chosen: set[int] = set()
    for members in modules.values():
        k = min(int(round(fraction * len(members))), len(members) - 1)
        order = scores[members].argsort()[:k]
        chosen |= {members[j] for j in order.tolist()}
    return chosen
