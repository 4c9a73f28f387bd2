r"""Layer input Hessians :math:`2 X X^\top / n` for :func:`hesse.quant.gptq`, one block at a time.

The calibrator is the one SparseGPT (``hesse.prune``) uses, :mod:`hesse.problem.calibration`.
The quantizable layers are grouped by the transformer layer that holds them
(``bert.encoder.layer.3``, ``transformer.h.0``); layers outside every transformer layer (a
classifier, a pooler) form a last group; a model without transformer layers has one group per
layer. When the groups are the links of the model's chain of blocks (its largest
``ModuleList``), the first block's inputs are stored for every batch and each block runs once
on them to record its Hessians and once, quantized, to give the next block's inputs (as
SparseGPT, the reference GPTQ code and llm-compressor do); otherwise each group gets full
passes over the data that stop after its block.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from ..problem._calls import call_model
from ..problem.calibration import (
    BlockChain,
    blocks,
    capture,
    groups,
    hessians,
    input_rows,
    run_block,
    tensor_bytes,
)

__all__ = ["groups", "hessians", "input_rows", "group_hessians", "chain_of"]

Group = tuple[list[str], dict[str, torch.Tensor], dict[str, int]]


def group_hessians(
    model: nn.Module,
    plan: list[tuple[str, list[str]]],
    modules: Mapping[str, nn.Module],
    owners: Mapping[str, str],
    calib: list,
) -> Iterator[Group]:
    """``(layers, {layer: H}, {layer: rows})`` per group of ``plan``, in order.

    The caller quantizes the group's layers in ``model`` (in place) before it asks for the
    next group: the next Hessians are recorded through them.
    """
    found = chain_of(model, plan, calib)
    if found is None:
        for stop, names in plan:
            mods = {n: modules[owners[n]] for n in names}
            yield names, *hessians(model, mods, calib, _stop(stop, modules))
        return
    chain, links = found
    todo = {g: names for g, names in plan if g}
    for prefix, block in links:
        if not todo:
            break
        names = todo.pop(prefix[:-1], [])
        held = 0
        if names:
            mods = {n: modules[owners[n]] for n in names}
            Hs, rows = hessians(model, mods, chain.inputs, None, run=_on(block))
            held = tensor_bytes(list(Hs.values()))
            yield names, Hs, rows
        if todo:
            chain.step(block, None, held)
    del chain
    rest = [names for g, names in plan if not g]
    for names in rest:
        yield names, *hessians(model, {n: modules[owners[n]] for n in names}, calib, None)


def chain_of(
    model: nn.Module, plan: list[tuple[str, list[str]]], calib: list
) -> tuple[BlockChain, list[tuple[str, nn.Module]]] | None:
    """The chain of blocks with the first block's stored inputs, or None where it does not apply.

    It does not apply without a ``ModuleList``, to groups that are not its links, or to a
    forward that never calls the first block.
    """
    links = blocks(model)
    names = {prefix[:-1] for prefix, _ in links}
    if not links or not all(g in names for g, _ in plan if g) or all(not g for g, _ in plan):
        return None
    try:
        inputs = capture([_call(model, b) for b in calib], links[0][1], "gptq")
    except ValueError:
        return None
    return BlockChain(inputs), links


def _call(model: nn.Module, batch):
    return lambda: call_model(model, batch)


def _on(block: nn.Module):
    return lambda stored: run_block(block, None, [stored])


def _stop(name: str, modules: Mapping[str, nn.Module]) -> nn.Module | None:
    """The block after which a calibration pass may end (None: run the whole model)."""
    module = modules.get(name) if name else None
    return module if module is not None and any(True for _ in module.children()) else None
