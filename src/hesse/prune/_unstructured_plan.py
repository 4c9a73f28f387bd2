"""Unstructured and ``n:m`` pruning of weights: gradual steps of saliency, mask and OBS update."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..objective import Objective
from ._gradients import objective_at
from ._patterns import group_mask, parse_pattern
from ._result import PrunePlan
from .layerwise import obs_layer, record_hessians
from .saliency import METHODS, curvature_for, scored

WEIGHT_METHODS = (*METHODS, "layer_obs")
SCOPES = ("global", "layer")


@dataclass(frozen=True)
class Settings:
    """The options of :func:`hesse.prune.prune` that a step reads."""

    method: str
    curvature: str
    damping: float
    m: int | None
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
    names, skipped = _prunable(obj, params, group)
    target = obj.restrict(names)
    w = target.space.join(target.params).detach().clone()
    alive = torch.ones(w.shape[0], dtype=torch.bool)
    lams, rhos, predicted = [], [], []
    for t in range(1, recompute + 1):
        step = _step_target(sparsity, keep, group, t / recompute)
        at = objective_at(target, target.space.split(w))
        if s.method == "layer_obs":
            w, alive, lam, rho = _layer_step(at, w, step, s)
        else:
            w, alive, lam, rho, pred = _saliency_step(at, w, alive, step, scope, s)
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
        sparsity=1 - keep / group if group else sparsity,
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


def _prunable(obj: Objective, params, group: int | None) -> tuple[list[str], list[str]]:
    """Names to prune, and those an ``n:m`` pattern leaves out (default selection only)."""
    shapes = dict(zip(obj.space.names, obj.space.shapes, strict=True))
    if params is not None:
        names = obj.space.select(params)
        bad = [n for n in names if group and _row(shapes[n]) % group]
        if bad:
            raise ValueError(
                f"prune: the pattern's groups of {group} do not divide the rows of {bad[0]!r} "
                f"({_row(shapes[bad[0]])} weights a row); leave it out of params= or prune it "
                "unstructured."
            )
        return names, []
    embeddings = {
        f"{name}.weight" if name else "weight"
        for name, module in obj.model.named_modules()
        if isinstance(module, nn.Embedding)
    }
    names = [n for n in obj.space.names if len(shapes[n]) >= 2 and n not in embeddings]
    skipped = [n for n in names if group and _row(shapes[n]) % group]
    names = [n for n in names if n not in skipped]
    if not names:
        raise ValueError(
            "prune: no weight to prune: the default takes weights of at least two dimensions "
            "outside embeddings (whose rows the pattern divides); pass params=."
        )
    return names, skipped


def _row(shape: torch.Size) -> int:
    return shape.numel() // shape[0] if len(shape) >= 2 else shape.numel()


def _saliency_step(at: Objective, w, alive, step: _Target, scope: str, s: Settings):
    """Score, choose the new zeros among the weights still alive, and move the others."""
    if s.method == "magnitude":
        scores, H = w.abs(), None
    else:
        H = curvature_for(
            at, s.method, s.curvature, s.damping, s.m, s.batch_size, s.budget, s.seed,
            s.fisher_block, alive,
        )  # fmt: skip
        scores = scored(at, w, H, s.method).flat
    kept = _select(scores, alive, at.space, step, scope)
    pred = float("nan")
    if s.method in ("obs", "mfac"):
        delta, pred = H.obs_update(w, (alive & ~kept).nonzero().flatten())
        w = w + delta
    lam, rho = (H.damping, H.relative) if H is not None else (0.0, 0.0)
    return w * kept, kept, lam, rho, pred


def _select(scores, alive, space, step: _Target, scope: str) -> torch.Tensor:
    """Kept weights: the pruned stay pruned, the least salient of the others join them."""
    scores = scores.detach().to(torch.float64).masked_fill(~alive, -torch.inf)
    parts = space.split(scores)
    if step.group is not None:
        masks = {
            n: group_mask(p.reshape(p.shape[0] if p.dim() > 1 else 1, -1), step.keep, step.group)
            for n, p in parts.items()
        }
        return space.join({n: m.reshape(parts[n].shape) for n, m in masks.items()})
    if scope == "global":
        return _keep_largest(scores, step.fraction)
    kept = {n: _keep_largest(p.reshape(-1), step.fraction) for n, p in parts.items()}
    return space.join({n: k.reshape(parts[n].shape) for n, k in kept.items()})


def _keep_largest(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    k = int(round(fraction * scores.numel()))
    kept = torch.ones_like(scores, dtype=torch.bool)
    kept[scores.argsort()[:k]] = False
    return kept


def _layer_step(at: Objective, w, step: _Target, s: Settings):
    """One OBC/SparseGPT sweep of every pruned weight, with input Hessians at ``w``."""

    def data_pass() -> None:
        for batch in at.batches():
            at.batch_loss(at.params, batch)

    Hs = record_hessians(data_pass, at.params)
    new, lam, rho = {}, 0.0, 0.0
    for name, W in at.params.items():
        if step.group is not None and step.keep == step.group:
            new[name] = W
            continue
        pattern = f"{step.keep}:{step.group}" if step.group else None
        r = obs_layer(
            W.reshape(W.shape[0], -1) if W.dim() > 1 else W[None],
            Hs[name],
            sparsity=None if pattern else step.fraction,
            pattern=pattern,
            block=s.block,
            damping=s.damping,
        )
        new[name] = r.weight.reshape(W.shape).to(W)
        lam, rho = max(lam, r.damping), max(rho, r.relative_damping)
    w = at.space.join(new)
    return w, w != 0, lam, rho
