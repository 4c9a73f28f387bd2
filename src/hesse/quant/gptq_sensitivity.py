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

``measure="kfac"`` is deterministic and PSD: the second-order loss rise of the layer's ACTUAL
GPTQ error :math:`\Delta_i(b) = \hat W_i^{(b)} - W_i` under the Kronecker-factored GGN
(:class:`~hesse.KFACOperator`, Martens & Grosse 2015; or :class:`~hesse.EKFACOperator`),

.. math::
    \Omega_i(b) = \tfrac12 \mathrm{vec}(\Delta_i)^\top (G_i \otimes A_i)\,
    \mathrm{vec}(\Delta_i) = \tfrac12 \mathrm{tr}\big(\Delta_i A_i \Delta_i^\top G_i\big),

:math:`A_i` the second moment of the layer's inputs, :math:`G_i` that of the output gradients
of the exact GGN (KFAC's ``kind="exact"``; ``"mc"`` for a large vocabulary). Unlike HAWQ-V2's
:math:`\bar s_i \|\Delta\|^2` it sees the direction of the error: GPTQ moves the weights
where :math:`A_i` is small, and :math:`G_i` weighs the outputs the loss cares about. It is
the predicted rise of the objective's mean loss for that layer alone (no factor 1/2 dropped).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import torch
from torch import nn

from ..operators import KRONECKER_KINDS, EKFACOperator, KFACOperator, kronecker_operator
from ..problem._evaluate import evaluate
from ..problem._weights import as_rows
from ..problem.objective import Objective
from ._calibrate import group_hessians, groups
from ._gptq_layer import GptqLayerResult, gptq_layer
from ._layers import _scan, output_axes, quantizable
from .quantizer import Quantizer
from .sensitivity import Sensitivity

OMEGA = {
    "ratio": "HAWQ-V2 omega x GPTQ error / RTN error (layer inputs)",
    "loss": "measured calibration-loss increase, the layer alone GPTQ'd",
    "kfac": "1/2 tr(dW A dW^T G): the GPTQ error under the KFAC GGN block G x A",
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
    curvature: KFACOperator | EKFACOperator | Objective | None = None,
) -> Sensitivity:
    r"""``sens`` with each ``omega[b]`` rescaled (or measured) for GPTQ at ``b`` bits.

    Each layer of ``sens`` is quantized by :func:`hesse.quant._gptq_layer.gptq_layer` at every
    width of ``sens.bits``, with input Hessians of the float model, recorded one transformer
    block at a time. ``measure="ratio"``:
    :math:`\Omega_i(b) \leftarrow \Omega_i(b)\, e^{GPTQ}_i(b) / e^{RTN}_i(b)` (module
    docstring). ``measure="loss"``: :math:`\Omega_i(b) \leftarrow \max(L_i(b) - L, 0)`, the
    calibration loss with that layer alone GPTQ'd, minus the float loss (costs one pass over
    ``calib`` per layer and width). ``measure="kfac"``: :math:`\Omega_i(b) \leftarrow
    \tfrac12 \mathrm{tr}(\Delta_i A_i \Delta_i^\top G_i)` for the GPTQ error
    :math:`\Delta_i = \hat W_i - W_i` and the layer's block :math:`G_i \otimes A_i` of
    ``curvature`` (deterministic, :math:`\ge 0`; no pass over the data beyond the factors').
    ``delta_sq`` is kept; ``settings["omega"]`` says what Ω now means. Widths below 2 keep
    their round-to-nearest Ω (GPTQ needs a zero level).

    Args:
        sens: Sensitivities from :func:`hesse.quant.sensitivity` of ``model``'s layers
            (``method="kfac"`` costs no products and pairs with ``measure="kfac"``).
        model: The network (weights swapped in and restored for ``measure="loss"``).
        calib: Calibration batches, as for :func:`hesse.quant.gptq`.
        group_size: GPTQ's inputs per grid (None, or not dividing: one grid per output).
        symmetric: Symmetric grids.
        act_order: GPTQ's column order.
        damping: Relative damping.
        full_range: GPTQ's grid, as :func:`hesse.quant.gptq` (pass the same value to both).
        measure: ``"ratio"`` (cheap), ``"loss"`` (measured calibration-loss increase) or
            ``"kfac"`` (the GPTQ error under the Kronecker-factored GGN).
        loss: ``loss(outputs, targets)`` for ``measure="loss"`` (None: a Hugging Face model's
            own loss), as :func:`hesse.evaluate`.
        loss_fn: ``loss_fn(model, batch) -> (mean_loss, weight)`` instead of ``loss``.
        curvature: For ``measure="kfac"``: a :class:`~hesse.KFACOperator` or
            :class:`~hesse.EKFACOperator` of ``model`` whose parameters include the layers'
            weights, or an :class:`~hesse.Objective` of ``model`` (its GGN's KFAC, factors of
            kind ``"exact"``, is built on the layers' weights; build ``KFACOperator(obj,
            kind="mc")`` yourself for a language model's large vocabulary).

    Returns:
        A new :class:`Sensitivity`; use it with :func:`hesse.quant.allocate`, then
        ``gptq(model, calib, bits=allocation.bits, full_range=full_range)``.

    Raises:
        ValueError: an unknown ``measure``; ``measure="kfac"`` without ``curvature``, or a
            ``curvature`` that does not cover a layer's weight.
    """
    if measure not in OMEGA:
        raise ValueError(
            f"gptq_sensitivity: measure must be one of {tuple(OMEGA)}, got {measure!r}."
        )
    K = _kronecker(sens, curvature) if measure == "kfac" else None
    calib = list(calib)
    grid: dict[str, Any] = dict(group_size=group_size, symmetric=symmetric, act_order=act_order,
                                damping=damping, full_range=full_range)  # fmt: skip
    base = evaluate(model, calib, loss, loss_fn=loss_fn).loss if measure == "loss" else 0.0
    new: dict[str, dict[int, float]] = {}
    for item in gptq_weights(model, sens.names, sens.bits, calib, **grid):
        n, b, r = item.name, item.bits, item.result
        if measure == "loss":
            w = max(_loss_with(model, item.weight, r.weight, calib, loss, loss_fn) - base, 0.0)
        elif measure == "kfac":
            w = kfac_omega(cast(KFACOperator, K), sens[n].param, r.weight - item.weight)
        else:
            rtn = r.rtn_error
            if full_range:
                rtn = _rtn_error(
                    item.weight, item.hessian, b, item.group_size, symmetric, item.axis
                )
            w = sens[n].omega[b] * r.error / rtn if rtn > 0 else sens[n].omega[b]
        new.setdefault(n, {})[b] = w
    rows = tuple(
        dataclasses.replace(row, omega={b: new[row.name].get(b, w) for b, w in row.omega.items()})
        for row in sens.layers
    )
    what = OMEGA[measure]
    return dataclasses.replace(sens, layers=rows, settings=sens.settings | {"omega": what})


@dataclasses.dataclass(frozen=True)
class GptqWeight:
    r"""One layer GPTQ'd alone at one width, by :func:`gptq_weights`.

    Attributes:
        name: The layer.
        bits: The width.
        weight: The model's parameter (float, untouched).
        result: :class:`~hesse.quant._gptq_layer.GptqLayerResult` (``result.weight`` is
            :math:`\hat W`).
        hessian: The float model's input Hessian :math:`2XX^\top/n` ``(in, in)``.
        axis: The weight's output axis.
        group_size: The group size used (None: one grid per output).
    """

    name: str
    bits: int
    weight: torch.Tensor
    result: GptqLayerResult
    hessian: torch.Tensor
    axis: int
    group_size: int | None


def gptq_weights(
    model: nn.Module,
    names: Iterable[str],
    bits: Iterable[int],
    calib: list,
    *,
    group_size: int | None = 128,
    symmetric: bool = True,
    act_order: bool = True,
    damping: float = 0.01,
    full_range: bool = True,
) -> Iterator[GptqWeight]:
    """Each layer of ``names`` GPTQ'd alone at each width of ``bits`` (>= 2), block by block.

    The input Hessians are the float model's, one transformer block's at a time (the
    calibration of :func:`hesse.quant.gptq`, its chain of blocks run with the float weights).
    """
    wanted = set(names)
    layers = {n: p for n, p in quantizable(model).items() if n in wanted}
    owners = {n: o for n, (_, o) in _scan(model).items()}
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    axes = output_axes(model, layers)
    widths = [b for b in bits if b >= 2]
    plan = groups(layers, owners)
    for group, Hs, _ in group_hessians(model, plan, modules, owners, list(calib)):
        for n in group:
            W = params[layers[n]]
            size = group_size if group_size and W[0].numel() % group_size == 0 else None
            for b in widths:
                r = gptq_layer(W, Hs[n], bits=b, group_size=size, symmetric=symmetric,
                               act_order=act_order, damping=damping, axis=axes[n],
                               scale_dtype=W.dtype, full_range=full_range)  # fmt: skip
                yield GptqWeight(n, b, W, r, Hs[n], axes[n], size)
            del Hs[n]


def kfac_omega(K: KFACOperator | EKFACOperator, param: str, delta: torch.Tensor) -> float:
    r"""The second-order loss rise of the change ``delta`` of the parameter ``param`` under ``K``.

    :math:`\tfrac12 \mathrm{vec}(\Delta)^\top K_{pp} \mathrm{vec}(\Delta)` for ``K``'s block of
    ``param`` (:math:`\tfrac12 \mathrm{tr}(\Delta A \Delta^\top G)` for a KFAC block
    :math:`G \otimes A`), accumulated in float64.

    Raises:
        ValueError: ``K`` does not analyse ``param``.
    """
    if K.space is None or param not in K.space.names:
        raise ValueError(
            f"gptq_sensitivity(measure='kfac'): the curvature does not cover {param!r}; build "
            "it on an Objective whose params= include every quantized layer's weight."
        )
    v = delta.detach().reshape(-1).to(K.dtype)
    Kv = K.restrict([param]) @ v
    return 0.5 * float(v.double() @ Kv.double())


def _kronecker(sens: Sensitivity, curvature) -> KFACOperator | EKFACOperator:
    """The Kronecker-factored GGN of ``measure="kfac"`` (built on the layers' weights)."""
    if isinstance(curvature, (KFACOperator, EKFACOperator)):
        return curvature
    if isinstance(curvature, Objective):
        kind = sens.curvature if sens.curvature in KRONECKER_KINDS else "ggn"
        sub = curvature.restrict([row.param for row in sens.layers])
        return kronecker_operator(sub, "kfac", kind)
    raise ValueError(
        "gptq_sensitivity(measure='kfac') needs curvature=: a KFACOperator or EKFACOperator of "
        f"the model, or an Objective to build one from; got {type(curvature).__name__}."
    )


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
