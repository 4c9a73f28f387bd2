"""Kronecker factors of a model sharded with FSDP2: built on the full layers, used on shards.

The factors of a layer are covariances of its inputs and output gradients, which under
``fully_shard`` are as large as without it: only the weights are split. Each process therefore
runs the factor passes on the full parameters of its own batches (gathered once, with the data
pass of a replicated model), and the passes' sums are all-reduced in float64 as for any
objective whose data is split over processes, so every process holds the full-data factors.
Products take a local shard, gather it to the full vector, apply the blocks and keep the local
rows of the result: the same numbers as one process with the unsharded model.
"""

from __future__ import annotations

import copy

import torch

from ..problem._calls import CallLossFn
from ..problem._shard import Shard, full_tensor, is_dtensor, plain_module
from ..problem.objective import Objective
from ..problem.params import ParamSpace


def unsharded(objective: Objective) -> Objective:
    """``objective`` over the full parameters on this process, its data unchanged (collective).

    The analysed parameters are gathered from the local shards; the other parameters and
    buffers that ``fully_shard`` split are taken whole from the model. The result is an
    objective of a replicated model whose data is this process's: its sums run over all
    processes (``Objective.accumulate``).
    """
    shard = objective.shard
    if shard is None:
        return objective
    flat = shard.gather(objective.space.join(objective.params)[:, None])[:, 0]
    state = dict(objective.model.named_parameters()) | dict(objective.model.named_buffers())
    full = copy.copy(objective)
    full.params = objective.full_space.split(flat)
    full.frozen = {
        n: objective._cast(full_tensor(state[n].detach())) if is_dtensor(state[n]) else t
        for n, t in objective.frozen.items()
    }
    full.shard, full._gatherer, full._most = None, None, None
    full.space = objective.full_space
    # the modules again without the gatherer's hooks: the factors' hooks go on these
    full.model = full._module = plain_module(objective._module)
    if objective.loss_fn is not None:
        full._caller = CallLossFn(full._module, objective.loss_fn)
    return full


def full_shapes(objective: Objective) -> Objective:
    """``objective`` with meta-device parameters of the full shapes: for counting factors.

    Under FSDP the layers' factors follow the full weights, not the local shards; this view
    has their shapes without gathering anything (no collective, no memory). Only shapes may be
    read from it.
    """
    if objective.shard is None:
        return objective
    view = copy.copy(objective)
    full = objective.full_space
    view.params = {
        n: torch.empty(shape, device="meta", dtype=objective.dtype)
        for n, shape in zip(full.names, full.shapes, strict=True)
    }
    view.shard, view.space = None, full
    return view


def on_full(shard: Shard | None, space: ParamSpace, V: torch.Tensor, apply) -> torch.Tensor:
    """``apply`` (per-parameter tensors to per-parameter tensors) on the full rows of ``V``.

    Args:
        shard: The objective's shard, or None (``V`` is then already full).
        space: The full parameter space.
        V: ``(d, k)`` local rows.
        apply: ``{name: (k, *shape)} -> {name: (k, *shape)}`` on full parameters.

    Returns:
        ``(d, k)``: the local rows of the full result.
    """
    full = V if shard is None else shard.gather(V)
    out = space.join(apply(space.split(full)))
    return out if shard is None else shard.local(out)
