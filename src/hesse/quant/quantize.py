"""A fake-quantized copy of a model at chosen bit-widths, and its measured loss."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from ._layers import output_axes, quantizable, unknown
from .quantizer import Quantizer, check_bits


def quantize(
    model: nn.Module, bits: Mapping[str, int], quantizer: Quantizer | None = None
) -> nn.Module:
    r"""A deep copy of ``model`` whose named weights are replaced by :math:`Q_b(W)`.

    Fake quantization: the weights hold the dequantized grid values :math:`s(q - z)` in the
    model's dtype, so the copy runs anywhere the model runs and its loss is the quantized
    model's loss. Grids run along each weight's output axis (a GPT-2 ``Conv1D`` weight's
    columns). Layers not in ``bits``, biases, norms and embeddings stay as they are; a weight
    tied to an embedding is quantized once, for all its uses.

    Args:
        model: The network; it is not modified.
        bits: ``{layer: bits}`` with layer names as :func:`hesse.quant.quantizable` gives them
            (e.g. ``Allocation.bits``).
        quantizer: The grid (default ``Quantizer()``: symmetric, per output channel).

    Returns:
        The quantized copy, in the mode ``model`` was in.

    Raises:
        ValueError: an unknown layer name, bits outside 1-16, or a group size that does not
            divide a layer's inputs per output unit.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 2))
        >>> q = quantize(net, {"0": 1})
        >>> bool((q[0].weight.abs() == q[0].weight.abs()[:, :1]).all()), net is q
        (True, False)
    """
    quantizer = quantizer or Quantizer()
    layers = quantizable(model)
    for name, b in bits.items():
        if name not in layers:
            raise ValueError(unknown(name, layers))
        check_bits(b, f"quantize({name!r})")
    axes = output_axes(model, layers)
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, b in bits.items():
            p = params[layers[name]]
            p.copy_(quantizer.fake(p, b, name=name, axis=axes[name]))
    return out
