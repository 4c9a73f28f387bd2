"""Unstructured and ``n:m`` pruning of weights: gradual steps of saliency, mask and OBS update."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..problem.objective import Objective
from ._gradients import objective_at
from ._patterns import nm_masks, output_axes, parse_pattern, row_length
from ._result import PrunePlan
from .layerwise import obs_layer, record_hessians
from .saliency import METHODS, curvature_for, scored

WEIGHT_METHODS = (*METHODS, "layer_obs", "sparsegpt")
SCOPES = ("global", "layer")


@dataclass(frozen=True)
class Settings:
    """The options of :func:`hesse.prune.prune` that a step reads."""

    method: str
    curvature: str
    damping: float
    m: int | str | None
    batch_size: int
    budget: int | None
    block: int
    fisher_block: int | None
    seed: int


@dataclass(frozen=True)
class _Target:
    """The sparsity of one step: a fraction, or ``keep`` of every ``group`` weights."""

    fraction: float
    keep: int | None
    group: int | None


def prune_weights(
    obj: Objective, sparsity, structure: str, scope, recompute: int, params, s: Settings
) -> PrunePlan:
    """Unstructured or ``n:m`` pruning; see :func:`hesse.prune.prune`."""
    if s.method not in WEIGHT_METHODS:
        raise ValueError(
            f"prune: method must be one of {WEIGHT_METHODS} for structure={structure!r}, got "
            f"{s.method!r}."
        )
    pattern = None if structure == "unstructured" else structure
    if pattern is None and sparsity is None:
        sparsity = 0.5
    keep, group = parse_pattern(pattern, sparsity, None, "prune")
    scope = _scope(scope, s.method)
    axes = output_axes(obj.model, obj.params)
    names, skipped = _prunable(obj, params, group, axes)
    target = obj.restrict(names)
    w = target.space.join(target.params).detach().clone()
    alive = torch.ones(w.shape[0], dtype=torch.bool)
    lams: list[float] = []
    rhos: list[float] = []
    predicted: list[float] = []
    for t in range(1, recompute + 1):
        step = _step_target(sparsity, keep, group, t / recompute)
        at = objective_at(target, target.space.split(w))
        if s.method == "layer_obs":
            w, alive, lam, rho = _layer_step(at, w, step, s, axes)
        else:
            w, alive, lam, rho, pred = _saliency_step(at, w, alive, step, scope, s, axes)
            predicted += [pred] if s.method in ("obs", "mfac") else []
        lams, rhos = lams + [lam], rhos + [rho]
    reads = s.method != "magnitude"
    return PrunePlan(
        weights=target.space.split(w),
        masks=target.space.split(alive),
        units=(),
        method=s.method,
        structure=structure,
        scope=scope,
        sparsity=1 - keep / group if keep is not None and group else sparsity,
        curvature=s.curvature if reads and s.method != "layer_obs" else None,
        damping=tuple(lams) if reads else (),
        relative_damping=tuple(rhos) if reads else (),
        predicted=tuple(predicted),
        skipped=tuple(skipped),
        removed_params=int((~alive).sum()),
        total_params=int(alive.numel()),
    )


def _scope(scope: str | None, method: str) -> str:
    if scope is None:
        return "layer" if method == "layer_obs" else "global"
    if scope not in SCOPES or (method == "layer_obs" and scope != "layer"):
        raise ValueError(
            f"prune: scope must be one of {SCOPES} ('layer' for method 'layer_obs', which "
            f"prunes each layer to the same sparsity), got {scope!r}."
        )
    return scope


def _step_target(sparsity, keep, group, progress: float) -> _Target:
    """Linear schedule: the fraction, or the zeros per group, grows to its final value."""
    if group is None:
        return _Target(sparsity * progress, None, None)
    zeros = int(round((group - keep) * progress))
    return _Target(zeros / group, group - zeros, group)


def _prunable(
    obj: Objective, params, group: int | None, axes: dict[str, int]
) -> tuple[list[str], list[str]]:
    """Names to prune, and those an ``n:m`` pattern leaves out (default selection only).

    A pattern's groups run along each output unit's reduction dimension: their size must
    divide the weights per output unit (``axes`` gives each parameter's output axis).
    """
    shapes = dict(zip(obj.space.names, obj.space.shapes, strict=True))

    def undivided(names: list[str]) -> list[str]:
        return [n for n in names if group and row_length(shapes[n], axes[n]) % group]

    if params is not None:
        names = obj.space.select(params)
        bad = undivided(names)
        if bad:
            raise ValueError(
                f"prune: the pattern's groups of {group} do not divide the rows of {bad[0]!r} "
                f"({row_length(shapes[bad[0]], axes[bad[0]])} weights per output unit); leave "
                "it out of params= or prune it unstructured."
            )
        return names, []
    embeddings = {
        f"{name}.weight" if name else "weight"
        for name, module in obj.model.named_modules()
        if isinstance(module, nn.Embedding)
    }
    names = [n for n in obj.space.names if len(shapes[n]) >= 2 and n not in embeddings]
    skipped = undivided(names)
    names = [n for n in names if n not in skipped]
    if not names:
        raise ValueError(
            "prune: no weight to prune: the default takes weights of at least two dimensions "
            "outside embeddings (whose rows the pattern divides); pass params=."
        )
    return names, skipped


def _saliency_step(at: Objective, w, alive, step: _Target, scope: str, s: Settings, axes):
    """Score, choose the new zeros among the weights still alive, and move the others."""
    if s.method == "magnitude":
        scores, H = w.abs(), None
    else:
        H = curvature_for(
            at, s.method, s.curvature, s.damping, s.m, s.batch_size, s.budget, s.seed,
            s.fisher_block, alive,
        )  # fmt: skip
        scores = scored(at, w, H, s.method).flat
    kept = _select(scores, alive, at.space, step, scope, axes)
    pred = float("nan")
    if H is not None and s.method in ("obs", "mfac"):
        delta, pred = H.obs_update(w, (alive & ~kept).nonzero().flatten())
        w = w + delta
    lam, rho = (H.damping, H.relative) if H is not None else (0.0, 0.0)
    return w * kept, kept, lam, rho, pred


def _select(scores, alive, space, step: _Target, scope: str, axes) -> torch.Tensor:
    """Kept weights: the pruned stay pruned, the least salient of the others join them."""
    scores = scores.detach().to(torch.float64).masked_fill(~alive, -torch.inf)
    parts = space.split(scores)
    if step.keep is not None and step.group is not None:  # n:m (both set or neither)
        return space.join(nm_masks(parts, axes, step.keep, step.group))
    if scope == "global":
        return _keep_largest(scores, step.fraction)
    kept = {n: _keep_largest(p.reshape(-1), step.fraction) for n, p in parts.items()}
    return space.join({n: k.reshape(parts[n].shape) for n, k in kept.items()})


def _keep_largest(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    k = int(round(fraction * scores.numel()))
    kept = torch.ones_like(scores, dtype=torch.bool)
    kept[scores.argsort()[:k]] = False
    return kept


def _layer_step(at: Objective, w, step: _Target, s: Settings, axes):
    """One OBC/SparseGPT sweep of every pruned weight, with input Hessians at ``w``."""

    def data_pass() -> None:
        for batch in at.batches():
            at.batch_loss(at.params, batch)

    Hs = record_hessians(data_pass, at.params)
    # a gradual n:m step may not prune yet (keep == group): sparsity 0
    nm = step.keep is not None and step.group is not None and step.keep < step.group
    pattern = f"{step.keep}:{step.group}" if nm else None
    new, kept, lam, rho = {}, {}, 0.0, 0.0
    for name, W in at.params.items():
        r = obs_layer(
            W,
            Hs[name],
            sparsity=None if pattern else step.fraction,
            pattern=pattern,
            block=s.block,
            damping=s.damping,
            axis=axes[name],
        )
        new[name], kept[name] = r.weight.to(W), r.mask
        lam, rho = max(lam, r.damping), max(rho, r.relative_damping)
    return at.space.join(new), at.space.join(kept), lam, rho
