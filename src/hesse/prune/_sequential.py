r"""SparseGPT with sequential calibration: one transformer block at a time, in bounded memory.

SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot", Sec. 3 and Alg. 1) prunes a model block by block: the inputs of block
:math:`i` are the outputs of blocks :math:`0..i-1` *already pruned*, so each layer's input
Hessian :math:`H = 2 X X^\top / n` sees the errors that pruning upstream made, and only one
block's inputs and Hessians are held at a time. Within a block all layers read one pass of the
(still dense) block, as in the reference code and llm-compressor's sequential pipeline.

The blocks are the children of the model's ``nn.ModuleList`` that holds the most parameters
(``bert.encoder.layer``, ``transformer.h``, ``model.layers``); they must form a chain (each
block's output, or its first element, is the next block's first input). Weights outside the
blocks (a classifier, a pooler) are pruned last, from one pass of the model with every block
already pruned. A model without a ``ModuleList`` is one piece: one pass, all Hessians at once.

Where hesse departs from the reference code (IST-DASLab/sparsegpt; llm-compressor's
``sparsify_weight`` is the same): Hessians and sweeps run in float64 (they use float32); a
block of columns prunes exactly its share of the sparsity (their ``tmp <= thresh`` prunes one
weight more per block: 50.1% for 50%); an always-zero input is pruned first rather than
zeroed beyond the sparsity; and by default (``fallback=True``) the magnitude mask, with and
without the sweep's updates, competes with the sweep's own mask on the exact layer error
:math:`\mathrm{tr}((W - \hat W) H (W - \hat W)^\top)`, so a layer is never pruned worse than by
magnitude (``fallback=False`` is the paper's algorithm, tested equal to a float64
transcription of it).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..problem.calibration import BlockChain, capture, peak_rss, run_block, tensor_bytes
from ..problem.calibration import blocks as chain_blocks
from ..problem.objective import Objective
from ._patterns import output_axes, parse_pattern
from ._result import Calibration, PrunePlan
from ._unstructured_plan import _prunable
from .layerwise import obs_layer, record_hessians


@dataclass(frozen=True)
class SweepOptions:
    """The options of one :func:`obs_layer` call per weight."""

    sparsity: float | None
    pattern: str | None
    block: int
    damping: float
    fallback: bool


def sparsegpt_plan(
    obj: Objective,
    sparsity: float | None,
    structure: str,
    params: Any,
    *,
    block: int = 128,
    damping: float = 0.01,
    sequential: bool = True,
    fallback: bool = True,
) -> PrunePlan:
    """``prune(obj, method="sparsegpt")``: see :func:`hesse.prune.prune`."""
    pattern = None if structure == "unstructured" else structure
    if pattern is None and sparsity is None:
        sparsity = 0.5
    keep, group = parse_pattern(pattern, sparsity, None, "prune")
    axes = output_axes(obj.model, obj.params)
    names, skipped = _prunable(obj, params, group, axes)
    opts = SweepOptions(None if pattern else sparsity, pattern, block, damping, fallback)
    weights, masks, lam, rho, calibration = sparsegpt_weights(
        obj, names, axes, opts, sequential=sequential
    )
    removed = sum(int((~m).sum()) for m in masks.values())
    fraction = 1 - keep / group if keep and group else cast(float, sparsity)
    return PrunePlan(
        weights=weights, masks=masks, units=(), method="sparsegpt", structure=structure,
        scope="layer", sparsity=fraction,
        curvature=None, damping=(lam,), relative_damping=(rho,), predicted=(),
        skipped=tuple(skipped), removed_params=removed,
        total_params=sum(m.numel() for m in masks.values()), calibration=calibration,
    )  # fmt: skip


def sparsegpt_weights(
    obj: Objective,
    names: list[str],
    axes: Mapping[str, int],
    opts: SweepOptions,
    *,
    sequential: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float, float, Calibration]:
    """Prune ``names`` of ``obj`` by the SparseGPT sweep, block after block.

    Returns:
        ``(weights, masks, damping, relative_damping, calibration)``: the pruned weights and
        their masks by name, the largest damping used, and :class:`Calibration`.
    """
    state = _Sweep(obj, axes, opts)
    blocks = chain_blocks(obj.model) if sequential else []
    if not any(n.startswith(p) for p, _ in blocks for n in names):
        blocks = []
    planned = 0
    if blocks:
        passes = [functools.partial(obj.batch_loss, obj.params, b) for b in obj.batches()]
        inputs = capture(passes, blocks[0][1], "prune (sparsegpt)")
        per_block = [_hessian_bytes(obj, names, axes, p) for p, _ in blocks]
        planned = (
            tensor_bytes(inputs) + tensor_bytes([args[0] for args, _ in inputs]) + max(per_block)
        )
        chain = BlockChain(inputs)
        del inputs
        for prefix, block in blocks:
            state.block(prefix, block, names, chain)
        del chain
    rest = {n: obj.params[n] for n in names if n not in state.done}
    if rest:
        planned = max(planned, _hessian_bytes(obj, list(rest), axes, ""))
        at = obj.params | state.done
        state.sweep(record_hessians(lambda: _full_pass(obj, at), rest), "", 0)
    calibration = Calibration(bool(blocks), state.pieces, planned, state.peak, peak_rss())
    return state.done, state.masks, state.damping, state.relative, calibration


class _Sweep:
    """What the sweeps have pruned so far, and the largest damping and memory they took."""

    def __init__(self, obj: Objective, axes: Mapping[str, int], opts: SweepOptions):
        self.obj, self.axes, self.opts = obj, axes, opts
        self.done: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.damping = self.relative = 0.0
        self.peak = self.pieces = 0

    def block(self, prefix: str, block: nn.Module, names: list[str], chain: BlockChain) -> None:
        """Prune one block's weights from the chain's inputs; move the chain to the next block."""
        mine = {n[len(prefix) :]: self.obj.params[n] for n in names if n.startswith(prefix)}
        values = _local_of(self.obj.frozen | self.obj.params, prefix)
        run = functools.partial(run_block, block, values, chain.inputs)
        Hs = record_hessians(run, mine) if mine else {}
        self.sweep(Hs, prefix, tensor_bytes(chain.inputs))
        chain.step(block, values | _local_of(self.done, prefix), tensor_bytes(list(Hs.values())))
        self.peak = max(self.peak, chain.peak)

    def sweep(self, Hs: Mapping[str, torch.Tensor], prefix: str, held: int) -> None:
        """:func:`obs_layer` on each weight of ``Hs`` (named within ``prefix``)."""
        o = self.opts
        for local, H in Hs.items():
            name, W = prefix + local, self.obj.params[prefix + local]
            r = obs_layer(
                W, H, sparsity=o.sparsity, pattern=o.pattern, block=o.block, damping=o.damping,
                axis=self.axes[name], fallback=o.fallback,
            )  # fmt: skip
            self.done[name], self.masks[name] = r.weight.to(W), r.mask
            self.damping = max(self.damping, r.damping)
            self.relative = max(self.relative, r.relative_damping)
        self.pieces += bool(Hs)
        self.peak = max(self.peak, held + tensor_bytes(list(Hs.values())))


def _local_of(named: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {n[len(prefix) :]: t for n, t in named.items() if n.startswith(prefix)}


def _full_pass(obj: Objective, params: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for batch in obj.batches():
            obj.batch_loss(params, batch)


def _hessian_bytes(obj: Objective, names: list[str], axes: Mapping[str, int], prefix: str) -> int:
    """Bytes of the float64 input Hessians ``(in, in)`` of the weights under ``prefix``."""
    shapes = {n: obj.params[n].shape for n in names if n.startswith(prefix)}
    return sum(8 * (s.numel() // s[axes[n]]) ** 2 for n, s in shapes.items())
