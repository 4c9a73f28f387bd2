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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from torch import nn

from ._calibrate import groups, hessians
from ._gptq_layer import gptq_layer
from ._layers import _scan, output_axes, quantizable
from .sensitivity import Sensitivity


def gptq_sensitivity(
    sens: Sensitivity,
    model: nn.Module,
    calib: Iterable,
    *,
    group_size: int | None = 128,
    symmetric: bool = True,
    act_order: bool = True,
    damping: float = 0.01,
) -> Sensitivity:
    r"""``sens`` with each ``omega[b]`` multiplied by GPTQ's error ratio at ``b`` bits.

    Each layer of ``sens`` is quantized by :func:`hesse.quant._gptq_layer.gptq_layer` at every
    width of ``sens.bits``, with input Hessians of the float model, recorded one transformer
    block at a time; :math:`\Omega_i(b) \leftarrow \Omega_i(b)\, e^{GPTQ}_i(b) / e^{RTN}_i(b)`
    (module docstring). ``delta_sq`` is kept; ``settings["omega"]`` says what Ω now means.
    Widths below 2 keep their round-to-nearest Ω (GPTQ needs a zero level).

    Args:
        sens: Sensitivities from :func:`hesse.quant.sensitivity` of ``model``'s layers.
        model: The network (not modified).
        calib: Calibration batches, as for :func:`hesse.quant.gptq`.
        group_size: GPTQ's inputs per grid (None, or not dividing: one grid per output).
        symmetric: Symmetric grids.
        act_order: GPTQ's column order.
        damping: Relative damping.

    Returns:
        A new :class:`Sensitivity`; use it with :func:`hesse.quant.allocate`, then
        ``gptq(model, calib, bits=allocation.bits)``.
    """
    layers = {n: p for n, p in quantizable(model).items() if n in sens.names}
    owners = {n: o for n, (_, o) in _scan(model).items()}
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    axes = output_axes(model, layers)
    ratio: dict[str, dict[int, float]] = {}
    for stop, names in groups(layers, owners):
        block = modules.get(stop) if stop else None
        Hs, _ = hessians(model, {n: modules[owners[n]] for n in names}, calib, block)
        for n in names:
            W = params[layers[n]]
            size = group_size if group_size and W[0].numel() % group_size == 0 else None
            ratio[n] = {}
            for b in (b for b in sens.bits if b >= 2):
                r = gptq_layer(W, Hs[n], bits=b, group_size=size, symmetric=symmetric,
                               act_order=act_order, damping=damping, axis=axes[n])  # fmt: skip
                ratio[n][b] = r.error / r.rtn_error if r.rtn_error > 0 else 1.0
            del Hs[n]
    rows = tuple(
        dataclasses.replace(
            row, omega={b: w * ratio[row.name].get(b, 1.0) for b, w in row.omega.items()}
        )
        for row in sens.layers
    )
    settings = sens.settings | {"omega": "HAWQ-V2 omega x GPTQ error / RTN error (layer inputs)"}
    return dataclasses.replace(sens, layers=rows, settings=settings)
