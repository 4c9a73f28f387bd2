"""The memory :func:`hesse.quant.gptq` will hold at its peak, before it runs."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ._calibrate import groups
from ._layers import _scan, output_axes, quantizable

SWEEP_COPIES = 5
"""float64 ``(out, in)`` arrays alive while one layer is swept: the weight as rows, its
permuted working copy, the codes, the round-to-nearest candidate and the candidate's
difference; plus the Hessian and its inverse factor, two ``(in, in)`` arrays."""


@dataclass(frozen=True)
class GptqMemory:
    """Bytes of a :func:`hesse.quant.gptq` run at its peak, item by item.

    Attributes:
        model_bytes: The model's parameters and buffers.
        copy_bytes: The quantized copy (the same again).
        hessian_bytes: The float64 input Hessians of the largest group (a transformer block
            with ``sequential=True``, every layer without): the ``hessian_bytes`` the run reports.
        sweep_bytes: The largest layer's float64 working set (``SWEEP_COPIES``).
        group: The group whose Hessians are largest (a block's module name, or ``""``).
        total: The sum; one batch's activations come on top (measure them with a forward pass).
    """

    model_bytes: int
    copy_bytes: int
    hessian_bytes: int
    sweep_bytes: int
    group: str
    total: int

    def __str__(self) -> str:
        return (
            f"gptq peak ~ {_mib(self.total)}: model {_mib(self.model_bytes)}, copy "
            f"{_mib(self.copy_bytes)}, Hessians of {self.group or 'all layers'} "
            f"{_mib(self.hessian_bytes)}, sweep {_mib(self.sweep_bytes)}"
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def gptq_plan(model: nn.Module, *, sequential: bool = True) -> GptqMemory:
    """What :func:`hesse.quant.gptq` of every layer of ``model`` will hold at its peak.

    Args:
        model: The network.
        sequential: As for :func:`hesse.quant.gptq`.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> p = gptq_plan(net)
        >>> p.hessian_bytes == 16 * 16 * 8, p.group
        (True, '2')
    """
    layers = quantizable(model)
    owners = {n: o for n, (_, o) in _scan(model).items()}
    params = dict(model.named_parameters())
    axes = output_axes(model, layers)
    inputs = {n: params[p].numel() // params[p].shape[axes[n]] for n, p in layers.items()}
    plan = groups(layers, owners)
    if not sequential:
        plan = [("", list(layers))]
    sizes = [(sum(inputs[n] ** 2 * 8 for n in names), g) for g, names in plan]
    size, group = max(sizes, key=lambda s: s[0])  # the first of equal blocks
    sweep = max(params[p].numel() * 8 * SWEEP_COPIES + 2 * inputs[n] ** 2 * 8
                for n, p in layers.items())  # fmt: skip
    tensors = [*model.parameters(), *model.buffers()]
    model_bytes = sum(t.numel() * t.element_size() for t in tensors)
    total = 2 * model_bytes + size + sweep
    return GptqMemory(model_bytes, model_bytes, size, sweep, group, total)
