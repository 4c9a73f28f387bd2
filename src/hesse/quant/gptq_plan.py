"""The memory :func:`hesse.quant.gptq` will hold at its peak, before it runs."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..problem._calls import call_model
from ..problem.calibration import (
    CalibrationMemory,
    activation_bytes,
    calibration_memory,
    module_outputs,
    tensor_bytes,
)
from ._calibrate import chain_of, groups
from ._layers import _scan, output_axes, quantizable
from .gptq import _widths

GptqMemory = CalibrationMemory
"""The plan of a GPTQ run (:class:`hesse.problem.calibration.CalibrationMemory`)."""


def gptq_plan(
    model: nn.Module,
    calib: Iterable | None = None,
    *,
    sequential: bool = True,
    group_size: int | None = 128,
) -> CalibrationMemory:
    """What :func:`hesse.quant.gptq` of every layer of ``model`` will hold at its peak.

    The items (:class:`~hesse.problem.calibration.CalibrationMemory`): the quantized copy,
    the integer codes (float64), the largest block's float64 Hessians, and the larger of the
    recording transients (one batch's activations, measured on ``calib``'s first batch) and the
    widest layer's sweep; with a chain of blocks, the stored block inputs and outputs of every
    calibration batch (the first batch's, times the batches).

    Args:
        model: The network.
        calib: The calibration batches ``gptq`` will get (None: activations and stored states
            not counted).
        sequential: As for :func:`hesse.quant.gptq`.
        group_size: As for :func:`hesse.quant.gptq`.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> p = gptq_plan(net)
        >>> p.hessian_bytes == 16 * 16 * 8, p.group
        (True, '2')
    """
    found = quantizable(model)
    layers = {n: found[n] for n in _widths(model, 4)}  # gptq's layers (a tied LM head is not)
    owners = {n: o for n, (_, o) in _scan(model).items()}
    params = dict(model.named_parameters())
    axes = output_axes(model, layers)
    plan = groups(layers, owners) if sequential else [("", list(layers))]
    shapes = []
    for g, names in plan:
        for n in names:
            rows = params[layers[n]].shape[axes[n]]
            shapes.append((g, rows, params[layers[n]].numel() // rows))
    batches = list(calib) if calib is not None else []
    activations = stored = 0
    if batches:
        chain = chain_of(model, plan, batches[:1]) if sequential else None
        outputs = module_outputs(model, lambda: call_model(model, batches[0]))
        full_pass = chain is None or any(not g for g, _ in plan)
        prefixes = None if full_pass or chain is None else [p for p, _ in chain[1]]
        activations = activation_bytes(outputs, prefixes)
        if chain is not None:  # inputs and outputs of a block, for every batch
            held = chain[0].inputs  # (args, kwargs: an attention mask) and the outputs
            stored = (tensor_bytes(held) + tensor_bytes([a[0] for a, _ in held])) * len(batches)
    return calibration_memory(model, shapes, method="gptq", activations=activations,
                              stored=stored, group_size=group_size)  # fmt: skip
