r"""What quantizing a layer by GPTQ is predicted to cost: Ω scaled by GPTQ's error reduction.

HAWQ-V2's :math:`\Omega_i(b) = \bar s_i \|Q_b(W_i) - W_i\|^2` (the layer's curvature per
weight times the squared rounding error) predicts the loss of round-to-nearest. GPTQ changes
the weights to cancel the rounding error on the layer's inputs: its error on the layer
objective :math:`e_i(b) = \mathrm{tr}\big((W_i - \hat W_i) H^x_i (W_i - \hat W_i)^\top\big)`,
:math:`H^x_i = 2 X_i X_i^\top / n`, is a fraction of round-to-nearest's on the same grid. The
GPTQ sensitivity is

.. math::
    \Omega^{GPTQ}_i(b) = \Omega_i(b)\, e^{GPTQ}_i(b) / e^{RTN}_i(b),

the loss curvature's weighting of the layer kept, the size of its error taken from what GPTQ
leaves on the layer's outputs. (:math:`\bar s_i \|\hat W_i - W_i\|^2` itself would rank GPTQ
worse than round-to-nearest: GPTQ moves weights further to cancel the output error.)
Round-to-nearest's error :math:`e^{RTN}_i(b)` is taken on the grid of ``sens`` (hesse's
narrow :class:`Quantizer` grid, whose :math:`\|Q_b(W_i) - W_i\|^2` is in
:math:`\Omega_i(b)`), GPTQ's on the grid :func:`hesse.quant.gptq` will use (``full_range``).

``measure="loss"`` replaces the second-order model by a measurement:
:math:`\Omega_i(b) = \max(L(\hat W_i^{(b)}) - L(W), 0)`, the calibration loss with layer
:math:`i` alone GPTQ'd at :math:`b` bits, minus the float model's (one pass over ``calib`` per
layer and width). At 2 bits the quadratic model fails on MiniLM: the rounding error is no
longer small, and the traces (a few Hutchinson probes) do not see the damage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..problem._evaluate import evaluate
from ..problem._weights import as_rows
from ._calibrate import groups, hessians
from ._gptq_layer import gptq_layer
from ._layers import _scan, output_axes, quantizable
from .quantizer import Quantizer
from .sensitivity import Sensitivity

OMEGA = {
    "ratio": "HAWQ-V2 omega x GPTQ error / RTN error (layer inputs)",
    "loss": "measured calibration-loss increase, the layer alone GPTQ'd",
}


def gptq_sensitivity(
    sens: Sensitivity,
    model: nn.Module,
    calib: Iterable,
    *,
    group_size: int | None = 128,
    symmetric: bool = True,
    act_order: bool = True,
    damping: float = 0.01,
    full_range: bool = True,
    measure: str = "ratio",
    loss: Callable | None = None,
    loss_fn: Callable | None = None,
) -> Sensitivity:
    r"""``sens`` with each ``omega[b]`` rescaled (or measured) for GPTQ at ``b`` bits.

    Each layer of ``sens`` is quantized by :func:`hesse.quant._gptq_layer.gptq_layer` at every
    width of ``sens.bits``, with input Hessians of the float model, recorded one transformer
    block at a time. ``measure="ratio"``:
    :math:`\Omega_i(b) \leftarrow \Omega_i(b)\, e^{GPTQ}_i(b) / e^{RTN}_i(b)` (module
    docstring). ``measure="loss"``: :math:`\Omega_i(b) \leftarrow \max(L_i(b) - L, 0)`, the
    calibration loss with that layer alone GPTQ'd, minus the float loss (costs one pass over
    ``calib`` per layer and width). ``delta_sq`` is kept; ``settings["omega"]`` says what Ω
    now means. Widths below 2 keep their round-to-nearest Ω (GPTQ needs a zero level).

    Args:
        sens: Sensitivities from :func:`hesse.quant.sensitivity` of ``model``'s layers.
        model: The network (weights swapped in and restored for ``measure="loss"``).
        calib: Calibration batches, as for :func:`hesse.quant.gptq`.
        group_size: GPTQ's inputs per grid (None, or not dividing: one grid per output).
        symmetric: Symmetric grids.
        act_order: GPTQ's column order.
        damping: Relative damping.
        full_range: GPTQ's grid, as :func:`hesse.quant.gptq` (pass the same value to both).
        measure: ``"ratio"`` (cheap) or ``"loss"`` (measured calibration-loss increase).
        loss: ``loss(outputs, targets)`` for ``measure="loss"`` (None: a Hugging Face model's
            own loss), as :func:`hesse.evaluate`.
        loss_fn: ``loss_fn(model, batch) -> (mean_loss, weight)`` instead of ``loss``.

    Returns:
        A new :class:`Sensitivity`; use it with :func:`hesse.quant.allocate`, then
        ``gptq(model, calib, bits=allocation.bits, full_range=full_range)``.

    Raises:
        ValueError: an unknown ``measure``.
    """
    if measure not in ("ratio", "loss"):
        raise ValueError(f"gptq_sensitivity: measure must be 'ratio' or 'loss', got {measure!r}.")
    calib = list(calib)
    layers = {n: p for n, p in quantizable(model).items() if n in sens.names}
    owners = {n: o for n, (_, o) in _scan(model).items()}
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    axes = output_axes(model, layers)
    base = evaluate(model, calib, loss, loss_fn=loss_fn).loss if measure == "loss" else 0.0
    new: dict[str, dict[int, float]] = {}
    for stop, names in groups(layers, owners):
        block = modules.get(stop) if stop else None
        Hs, _ = hessians(model, {n: modules[owners[n]] for n in names}, calib, block)
        for n in names:
            W = params[layers[n]]
            size = group_size if group_size and W[0].numel() % group_size == 0 else None
            new[n] = {}
            for b in (b for b in sens.bits if b >= 2):
                r = gptq_layer(W, Hs[n], bits=b, group_size=size, symmetric=symmetric,
                               act_order=act_order, damping=damping, axis=axes[n],
                               scale_dtype=W.dtype, full_range=full_range)  # fmt: skip
                if measure == "loss":
                    new[n][b] = max(
                        _loss_with(model, W, r.weight, calib, loss, loss_fn) - base, 0.0
                    )
                    continue
                rtn = (
                    _rtn_error(W, Hs[n], b, size, symmetric, axes[n]) if full_range else r.rtn_error
                )
                new[n][b] = sens[n].omega[b] * r.error / rtn if rtn > 0 else sens[n].omega[b]
            del Hs[n]
    rows = tuple(
        dataclasses.replace(row, omega={b: new[row.name].get(b, w) for b, w in row.omega.items()})
        for row in sens.layers
    )
    what = OMEGA[measure]
    return dataclasses.replace(sens, layers=rows, settings=sens.settings | {"omega": what})


def _loss_with(model, W, W_hat, calib, loss, loss_fn) -> float:
    """The calibration loss with ``W`` replaced by ``W_hat`` (restored afterwards)."""
    keep = W.detach().clone()
    try:
        with torch.no_grad():
            W.copy_(W_hat)
        return evaluate(model, calib, loss, loss_fn=loss_fn).loss
    finally:
        with torch.no_grad():
            W.copy_(keep)


def _rtn_error(W, H, bits: int, size: int | None, symmetric: bool, axis: int) -> float:
    """Round-to-nearest's layer error on hesse's narrow grid (the one in ``sens``' Ω)."""
    grid = Quantizer(bits, "group", size, symmetric=symmetric) if size else None
    grid = grid or Quantizer(bits, "channel", symmetric=symmetric)
    D = as_rows((W.detach() - grid.fake(W.detach(), axis=axis)).double(), axis)
    return float(torch.einsum("ri,ij,rj->", D, H.double(), D))
