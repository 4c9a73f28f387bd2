r"""Hessian-diagonal estimators for the optimizers: Hutchinson and Gauss-Newton-Bartlett.

An estimator is a pluggable argument of :class:`~hesse.optim.AdaHessian` and
:class:`~hesse.optim.Sophia`. It works in three parts so that one estimate can be summed over
the micro-batches of a gradient-accumulation step:

- ``draw(params, generator)``: the randomness shared by every micro-batch of a step (the
  Rademacher probes), or None;
- ``contribution(probes, params, grads, logits, generator)``: one micro-batch's share, linear
  in its loss (the optimizer sums them); ``grads`` holds None for the parameters that the
  micro-batch's loss does not reach, and the share is a tensor for every parameter;
- ``finish(total, rows)``: the estimate from the sum (``rows``: logits rows seen).

``needs_graph`` says whether the gradients must be built with ``create_graph=True``;
``needs_logits`` whether the closure must return ``(loss, logits)``. All randomness comes from
the optimizer's ``torch.Generator``, whose state is in its ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

Tensors = list[torch.Tensor]


def rademacher(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A tensor of ``p``'s shape with independent entries +1 or -1, each with probability 1/2.

    Drawn on the generator's device (CPU) and moved to ``p``'s, so that the same seed gives the
    same probes everywhere. (``torch.randint_like(p, 0, 1) * 2 - 1``, which some libraries
    used, is -1 everywhere: ``randint``'s upper bound is exclusive.)

    Args:
        p: A tensor whose shape, dtype and device the probe takes.
        generator: A CPU ``torch.Generator``.

    Returns:
        The probe, shaped like ``p``.
    """
    z = torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int8)
    return (2 * z - 1).to(device=p.device, dtype=p.dtype)


@dataclass(frozen=True)
class Hutchinson:
    r"""Hutchinson's diagonal estimate :math:`\hat D = z \odot (H z)`, :math:`z` Rademacher.

    .. math:: \mathbb{E}[z \odot H z]_i = \sum_j H_{ij}\, \mathbb{E}[z_i z_j] = H_{ii}

    Unbiased for the diagonal of the Hessian of the loss that the closure returns; ``probes``
    averages that many independent probes (one double-backward each). Reference: Bekas,
    Kokiopoulou & Saad (2007), "An estimator for the diagonal of a matrix"; used by
    AdaHessian (Yao et al. 2021) and SophiaH (Liu et al. 2024).

    Args:
        probes: Probes per estimate (``>= 1``).
    """

    probes: int = 1
    needs_graph: ClassVar[bool] = True
    needs_logits: ClassVar[bool] = False

    def __post_init__(self):
        if self.probes < 1:
            raise ValueError(f"Hutchinson: probes must be >= 1, got {self.probes}.")

    def draw(self, params: Sequence[torch.Tensor], generator: torch.Generator) -> list[Tensors]:
        """``probes`` lists of Rademacher tensors shaped like ``params``."""
        return [[rademacher(p, generator) for p in params] for _ in range(self.probes)]

    def contribution(self, probes, params, grads, logits, generator) -> Tensors:
        r"""Mean over the probes of :math:`z \odot H z` for this micro-batch's graph."""
        total = [torch.zeros_like(p) for p in params]
        for i, z in enumerate(probes):
            keep = i < len(probes) - 1
            # parameters the loss does not reach (gradient None), or whose gradient has no
            # graph, have zero Hessian rows
            live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            Hz = torch.autograd.grad(
                [grads[i] for i in live], [params[i] for i in live],
                grad_outputs=[z[i] for i in live], retain_graph=keep, allow_unused=True,
            )  # fmt: skip
            for i, hi in zip(live, Hz, strict=True):
                if hi is not None:
                    total[i].add_(z[i] * hi.detach(), alpha=1 / len(probes))
        return total

    def finish(self, total: Tensors, rows: int) -> Tensors:
        """The summed contributions are the estimate."""
        return total


@dataclass(frozen=True)
class GaussNewtonBartlett:
    r"""Sophia's Gauss-Newton-Bartlett estimate :math:`B\,\hat g \odot \hat g`.

    Labels :math:`\hat y_b` are sampled from :math:`\mathrm{softmax}(f(\theta, x_b))` and
    :math:`\hat g = \nabla_\theta \frac1B \sum_b \ell_{CE}(f(\theta, x_b), \hat y_b)`. By
    Bartlett's identity :math:`\mathbb{E}_{\hat y}[\nabla \ell \nabla \ell^\top] = J^\top
    (\mathrm{diag}(p) - p p^\top) J`, and the cross terms between rows have mean zero, so

    .. math:: \mathbb{E}[B\, \hat g \odot \hat g] = \mathrm{diag}(G),

    the diagonal of the Gauss-Newton matrix of the mean cross-entropy over the ``B`` rows.
    Over micro-batches, :math:`B \hat g` is summed (each micro-batch contributes
    :math:`B_k \hat g_k`) and the estimate is :math:`(\sum_k B_k \hat g_k)^2 / B`.
    Reference: Liu, Li, Hall, Liang & Ma (2024), "Sophia: A Scalable Stochastic Second-order
    Optimizer for Language Model Pre-training", section 2.3.

    The closure returns ``(loss, logits)``; logits ``(..., C)`` are read as rows of ``C``
    classes: return only the rows that count (e.g. ``logits[targets != -100]``).
    """

    needs_graph: ClassVar[bool] = False
    needs_logits: ClassVar[bool] = True

    def draw(self, params: Sequence[torch.Tensor], generator: torch.Generator) -> None:
        """Nothing is shared between micro-batches (labels are sampled per row)."""
        return None

    def contribution(self, probes, params, grads, logits, generator) -> Tensors:
        r""":math:`B_k \hat g_k` for this micro-batch (``B_k`` rows of logits)."""
        rows = logits.reshape(-1, logits.shape[-1])
        probs = rows.detach().float().softmax(-1).cpu()
        labels = torch.multinomial(probs, 1, generator=generator)[:, 0].to(rows.device)
        sampled = F.cross_entropy(rows.float(), labels, reduction="sum")
        g = torch.autograd.grad(sampled, params, allow_unused=True)
        return [
            torch.zeros_like(p) if gi is None else gi.detach()
            for p, gi in zip(params, g, strict=True)
        ]

    def finish(self, total: Tensors, rows: int) -> Tensors:
        r""":math:`(\sum_k B_k \hat g_k)^2 / B`."""
        return [t * t / rows for t in total]


def spatial_average(estimate: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    r"""AdaHessian's spatial averaging: :math:`|\hat D|`, averaged over convolution kernels.

    For a convolution weight (``(out, in, *kernel)``; transposed: ``(in, out, *kernel)``)
    every entry is replaced by the mean of :math:`|\hat D|` over its kernel's spatial
    positions; a parameter of fewer than 3 dims gets :math:`|\hat D|`. This is the official
    code's ``get_trace`` (which averages 4-D kernels over dims 2 and 3; here any kernel rank).
    Whether a parameter is a convolution weight is not told by its number of dims (a ViT's
    ``(1, N, D)`` position embedding is not one): the caller decides, and
    :class:`~hesse.optim.AdaHessian` calls this for the weights of the convolution modules
    of its ``model``. Reference: Yao, Gholami, Shen, Mustafa, Keutzer & Mahoney (2021),
    "ADAHESSIAN: An Adaptive Second Order Optimizer for Machine Learning", section 3.3.

    Args:
        estimate: The diagonal estimate, shaped like ``param``.
        param: A convolution weight (or a parameter of fewer than 3 dims).

    Returns:
        A tensor shaped like ``param``.
    """
    if param.dim() < 3:
        return estimate.abs()
    kernel = tuple(range(2, param.dim()))
    return estimate.abs().mean(dim=kernel, keepdim=True).expand_as(estimate)
