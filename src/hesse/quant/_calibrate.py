r"""Layer input Hessians :math:`2 X X^\top / n`, one transformer block at a time.

The calibration of :func:`hesse.quant.gptq`: the quantizable layers are grouped by the
transformer layer that holds them (``bert.encoder.layer.3``, ``transformer.h.0``); layers
outside every transformer layer (a classifier, a pooler) form a last group; a model without
transformer layers has one group per layer. For each group the calibration data runs through
the model as quantized so far and stops after the group's transformer layer, so only one
group's Hessians are held at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..problem._blocks import _layers
from ..problem._calls import call_model


class _Stop(Exception):
    """Raised by a forward hook to end a calibration pass after the group's block."""


def groups(layers: Mapping[str, str], owners: Mapping[str, str]) -> list[tuple[str, list[str]]]:
    """``[(block module name or "", [layer, ...]), ...]`` in the order the layers are listed.

    Args:
        layers: ``{layer: parameter name}`` (:func:`hesse.quant.quantizable`).
        owners: ``{layer: name of the module that applies it}``.
    """
    blocks: dict[str, list[str]] = {}
    rest: list[str] = []
    for name in layers:
        spans = _layers(owners[name] + ".weight")
        if spans:
            blocks.setdefault(spans[0][0], []).append(name)
        else:
            rest.append(name)
    out = list(blocks.items())
    if not out:
        return [(owners[n], [n]) for n in rest]
    return out + ([("", rest)] if rest else [])


def hessians(
    model: nn.Module, modules: Mapping[str, nn.Module], data: Iterable, stop: nn.Module | None
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    r"""``({layer: H}, {layer: n})``: :math:`H = 2 X X^\top / n` of each module's inputs.

    Args:
        model: The network, run on each batch under ``torch.no_grad()``.
        modules: ``{layer: module}`` (``Linear``, ``Conv2d`` or Hugging Face ``Conv1D``).
        data: Calibration batches.
        stop: A module after whose forward the pass ends (None: the whole model).

    Raises:
        ValueError: a layer saw no input (its module never ran on the data).
    """
    gram: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    last: dict[str, Any] = {}
    hooks = {n: _recorder(n, gram, rows, last) for n in modules}
    handles = [m.register_forward_pre_hook(hooks[n]) for n, m in modules.items()]
    if stop is not None:
        handles.append(stop.register_forward_hook(_raise))
    try:
        with torch.no_grad():
            for batch in data:
                try:
                    call_model(model, batch)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in modules if n not in gram]
    if missing:
        raise ValueError(
            f"gptq: no calibration inputs reached {missing[:3]}; the model's forward never ran "
            "those modules on the data (is the data empty, or are they unused?)."
        )
    return {n: 2 * g / rows[n] for n, g in gram.items()}, rows


def _raise(module: nn.Module, args: object, out: object) -> None:
    raise _Stop


def _recorder(name: str, gram: dict, rows: dict, last: dict) -> Callable:
    r"""A pre-hook adding the batch's :math:`X X^\top` to ``gram[name]``.

    The product is taken in the inputs' dtype (float32 for a float32 model: the float64 product
    took half of GPTQ's time on MiniLM) and summed over batches in float64. Layers fed the same
    tensor (an attention's query, key and value) share one product (``last``).
    """

    def record(module: nn.Module, args: tuple) -> None:
        x = args[0]
        if last.get("x") is not x or last.get("kind") is not type(module):
            X = input_rows(module, x).detach()
            last.update(x=x, kind=type(module), G=(X.T @ X).to(torch.float64), n=X.shape[0])
        gram[name] = gram.get(name, 0) + last["G"]
        rows[name] = rows.get(name, 0) + last["n"]

    return record


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A module's inputs as rows ``(n, in)``: tokens, or a convolution's unfolded patches."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or isinstance(module.padding, str):
            raise ValueError(
                "gptq: grouped convolutions and string padding ('same') are not supported; "
                f"got groups={module.groups}, padding={module.padding!r}."
            )
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])
