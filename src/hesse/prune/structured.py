r"""Saliencies of whole heads and MLP neurons: NViT group saliency and HEAPr's output score.

NViT (Yang et al. 2023, "Global Vision Transformer Pruning with Hessian-Aware Saliency")
scores a group :math:`S` of weights (a head, a neuron, an embedding dimension) by the
second-order Taylor term of removing it all at once with the empirical Fisher,

.. math::
    s_S = \frac1m \sum_{i=1}^m \Big(\sum_{q \in S} w_q\, g_{iq}\Big)^2
        = w_S^\top F_{SS}\, w_S,

which ranks groups of different layers on one scale. HEAPr (atomic-expert pruning) scores
intermediate neuron :math:`j` of an MLP :math:`y = W h(x)` in the MLP's output space:
removing it changes the output of token :math:`t` by :math:`-W_{:j} h_{tj}`, so with the
per-token output gradient :math:`\gamma_t = \partial L / \partial y_t`,

.. math::
    s_j = \frac{1}{2N} \sum_t h_{tj}^2 \big(\gamma_t^\top W_{:j}\big)^2,

the output-space Fisher quadratic form of that change, over the :math:`N` counted tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..demo import tiny_lm
from ..problem.objective import Objective
from ._gradients import collect_gradients
from ._units import Unit, find_units, unit_index

if TYPE_CHECKING:
    from transformers.models.bert.modeling_bert import BertLayer


@dataclass(frozen=True)
class GroupSaliency:
    """Scores of heads or neurons; the smallest are removed first.

    Attributes:
        units: The scored :class:`Unit` objects (module, index, parameter slices).
        scores: ``(len(units),)`` float64 scores.
        method: ``"nvit"``, ``"heapr"``, ``"magnitude"`` or ``"random"``.
    """

    units: tuple[Unit, ...]
    scores: torch.Tensor
    method: str

    def by_module(self) -> dict[str, list[float]]:
        """``{module name: [score of unit 0, 1, ...]}``."""
        out: dict[str, list[float]] = {}
        for u, s in zip(self.units, self.scores.tolist(), strict=True):
            out.setdefault(u.module, []).append(s)
        return out


def group_saliency(
    obj: Objective,
    groups: str | Sequence[Unit] = "heads",
    *,
    m: int | str | None = "auto",
    batch_size: int = 1,
    seed: int = 0,
) -> GroupSaliency:
    r"""NViT saliency :math:`\frac1m \sum_i (\sum_{q \in S} w_q g_{iq})^2` of each group.

    Args:
        obj: The objective; it must analyse every parameter the groups own.
        groups: ``"heads"``, ``"channels"`` (MLP neurons) of the known modules, or units.
        m: Gradients (per chunk of ``batch_size`` samples; ``"auto"``: 256 or all when
            fewer; None: all).
        batch_size: Samples per gradient.
        seed: Seed of the chunks drawn.

    Returns:
        :class:`GroupSaliency` with ``method="nvit"``.

    Raises:
        ValueError: no such units in the model, or a unit parameter not analysed.
    """
    units = tuple(find_units(obj.model, groups) if isinstance(groups, str) else groups)
    index = [unit_index(obj.space, u) for u in units]
    G = collect_gradients(obj, m, batch_size=batch_size, seed=seed).to(torch.float64)
    w = obj.space.join(obj.params).detach().to(torch.float64)
    scores = torch.stack([((G[:, i] @ w[i]) ** 2).mean() for i in index])
    return GroupSaliency(units, scores, "nvit")


def expert_saliency(obj: Objective, mlp_modules: Sequence[str] | None = None) -> GroupSaliency:
    r"""HEAPr output-space score of every intermediate neuron of the MLPs (one data pass).

    Args:
        obj: The objective (``loss=`` or ``loss_fn=``); its model holds the MLPs.
        mlp_modules: Names of tiny-lm ``MLP`` or BERT layer modules (default: all of them).

    Returns:
        :class:`GroupSaliency` with ``method="heapr"``, one unit per neuron.

    Raises:
        ValueError: a name that is not a known MLP module, or a model without one.
    """
    units = find_units(obj.model, "channels")
    names = list(dict.fromkeys(u.module for u in units))
    wanted = names if mlp_modules is None else list(mlp_modules)
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise ValueError(
            f"expert_saliency: {unknown[:3]} are not MLP modules hesse knows; known: {names[:6]}."
        )
    probes = [_Probe(obj.model.get_submodule(n)) for n in wanted]

    def term(i: int, batch) -> tuple[torch.Tensor, float]:
        params = {n: p.detach().requires_grad_(True) for n, p in obj.params.items()}
        with torch.enable_grad():
            value, w = obj.batch_loss(params, batch)
            # gradients with respect to the MLP outputs only: no .grad is left in the model
            outputs = [probe.output for probe in probes if probe.output is not None]
            if len(outputs) < len(probes):
                idle = [n for n, probe in zip(wanted, probes, strict=True) if probe.output is None]
                raise ValueError(
                    f"expert_saliency: {idle[:3]} did not run on batch {i}: the model does not "
                    "use them (pass mlp_modules= with those it uses), or every label of the "
                    "batch is ignored, so that its loss does not run the model (leave it out)."
                )
            for probe, gamma in zip(probes, torch.autograd.grad(value, outputs), strict=True):
                probe.gamma = gamma.detach()
        return torch.cat([probe.take() for probe in probes]), w

    handles = [probe.attach() for probe in probes]
    try:
        flat = 0.5 * obj.accumulate(term).to(torch.float64)
    finally:
        for h in handles:
            h.remove()
    kept = tuple(u for n in wanted for u in units if u.module == n)
    return GroupSaliency(kept, flat, "heapr")


class _Probe:
    r"""Records an MLP's hidden activations :math:`h` and output gradients :math:`\gamma`."""

    def __init__(self, module: nn.Module):
        self.module = module
        # find_units knows tiny-lm's MLP and BertLayer only
        self.hooked = (
            module if isinstance(module, tiny_lm.MLP) else cast("BertLayer", module).output.dense
        )
        self.h: torch.Tensor | None = None
        self.gamma: torch.Tensor | None = None
        self.output: torch.Tensor | None = None

    def attach(self):
        return self.hooked.register_forward_hook(self._forward)

    def _forward(
        self, module: tiny_lm.MLP | nn.Linear, inputs: tuple, output: torch.Tensor
    ) -> None:
        x = inputs[0].detach()
        if isinstance(module, tiny_lm.MLP):
            x = F.gelu(F.linear(x, module.in_weight.detach(), module.in_bias.detach()))
        self.h, self.W, self.output = x, self._weight(module).detach(), output

    def _weight(self, module: tiny_lm.MLP | nn.Linear) -> torch.Tensor:
        return module.out_weight if isinstance(module, tiny_lm.MLP) else module.weight

    def take(self) -> torch.Tensor:
        r""":math:`\sum_t h_{tj}^2 (\gamma_t^\top W_{:j})^2` per neuron, for this batch."""
        h, gamma = cast(torch.Tensor, self.h), cast(torch.Tensor, self.gamma)  # set by this batch
        P = gamma @ self.W  # (..., I)
        s = ((h * P) ** 2).reshape(-1, P.shape[-1]).sum(0)
        self.h = self.gamma = self.output = None
        return s
