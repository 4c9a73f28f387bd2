r"""Smooth adversarial comp-sum losses (Mao, Mohri and Zhong 2023), on paired outputs.

Mao, Mohri and Zhong 2023, "Cross-Entropy Loss Functions: Theoretical Analysis and
Applications", Section 6: the comp-sum loss of the clean logits plus a smooth term that
penalises how far an adversarial input :math:`x'` (:math:`\|x' - x\| \le \gamma`) moves the
margin vector :math:`\bar\Delta_h(x, y) = (h_y(x) - h_{y'}(x))_{y'}`:

.. math::
    \tilde\ell_{\tau,\nu}(h, x, y) = \ell_\tau(h(x), y)
      + \nu \sup_{x'} \big\|\bar\Delta_h(x', y) - \bar\Delta_h(x, y)\big\|_2 .

The supremum is found by an attack (:func:`adversarial_pairs`) and then held fixed (Danskin's
theorem: the gradient at the maximiser is the gradient of the supremum), so the loss is a
function of the paired outputs :math:`f = (h(x), h(x'))`, shape ``(n, 2, C)``, which
:class:`Paired` produces from paired inputs ``(n, 2, ...)``. With :math:`r = h(x') - h(x)`,
:math:`t = D r` where :math:`D v = v_y \mathbf 1 - v` and :math:`M = \nu D^\top (I - \hat t
\hat t^\top) D / \|t\|`, the per-sample output Hessian is

.. math::
    H_i = \begin{pmatrix} H^\tau + M & -M \\ -M & M \end{pmatrix},

convex exactly when :math:`\ell_\tau` is (:math:`\tau \le 1`). At :math:`t = 0` (an attack that
moved nothing) the norm has no Hessian; :math:`M` is then set to 0 there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._base import OutputLoss, format_value
from .comp_sum import CompSum


@dataclass(frozen=True, repr=False)
class SmoothAdvCompSum(OutputLoss):
    r"""The smooth adversarial comp-sum loss on ``(n, 2, C)`` paired outputs (see the module).

    Args:
        tau: The comp-sum parameter :math:`\tau \ge 0` (1: adversarial cross-entropy).
        nu: Weight :math:`\nu \ge 0` of the smooth adversarial term.

    Example:
        >>> f = torch.tensor([[[2.0, 0.0], [2.0, 0.0]]])  # the attack moved nothing
        >>> y = torch.tensor([0])
        >>> bool(torch.isclose(SmoothAdvCompSum(1.0, 5.0)(f, y), CompSum(1.0)(f[:, 0], y)))
        True
    """

    tau: float = 1.0
    nu: float = 1.0
    outlier_rule = "no prediction (output Hessian rank up to 2C - 3)"

    def __post_init__(self):
        CompSum(self.tau)  # validates tau
        if not self.nu >= 0:
            raise ValueError(f"SmoothAdvCompSum: nu must be >= 0, got {self.nu!r}.")

    @property
    def convex(self) -> bool:  # type: ignore[override]
        r"""Convex in the paired outputs for :math:`\tau \le 1`."""
        return self.tau <= 1

    @property
    def spec(self) -> str:
        """``adv_comp_sum:tau=...,nu=...``."""
        return f"adv_comp_sum:tau={format_value(self.tau)},nu={format_value(self.nu)}"

    def per_sample(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        r"""``(n,)``: :math:`\ell_\tau(h(x_i)) + \nu \|D(h(x'_i) - h(x_i))\|`."""
        _check_pairs(outputs, targets)
        t = _margin_shift(outputs, targets)
        return CompSum(self.tau).per_sample(outputs[:, 0], targets) + self.nu * t.norm(dim=1)

    def sample_hessians(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``(n, 2C, 2C)`` in the layout of ``outputs[i].reshape(-1)`` (clean, then adversarial)."""
        _check_pairs(outputs, targets)
        n, _, C = outputs.shape
        Hc = CompSum(self.tau).sample_hessians(outputs[:, 0], targets)
        t = _margin_shift(outputs, targets)
        norm = t.norm(dim=1)
        safe = torch.where(norm > 0, norm, torch.ones_like(norm))
        u = t / safe[:, None]
        proj = torch.eye(C, dtype=t.dtype, device=t.device) - u[:, :, None] * u[:, None, :]
        D = _shift_matrix(targets, C, t.dtype)
        M = D.transpose(1, 2) @ proj @ D * (self.nu * (norm > 0) / safe)[:, None, None]
        top = torch.cat([Hc + M, -M], 2)
        return torch.cat([top, torch.cat([-M, M], 2)], 1)


class Paired(nn.Module):
    """Wrap a classifier so that ``(n, 2, ...)`` paired inputs give ``(n, 2, C)`` paired logits.

    Batches of ``(torch.stack([x, x_adv], 1), y)`` then make :class:`SmoothAdvCompSum` a loss of
    the model outputs, so :class:`~hesse.Objective` and its GGN see the adversarial term.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, 2, ...)`` inputs to ``(n, 2, C)`` outputs."""
        return self.model(x.flatten(0, 1)).unflatten(0, x.shape[:2])


def adversarial_pairs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int = 10,
    seed: int = 0,
) -> torch.Tensor:
    r"""``(n, 2, ...)`` pairs ``(x, x')``, :math:`x'` maximising the margin shift in an l-inf ball.

    Projected gradient ascent (Madry et al. 2018) on :math:`\|D(h(x') - h(x))\|` with step
    ``2.5 eps / steps`` from a seeded uniform start; the model is not changed.

    Args:
        model: ``(n, ...) -> (n, C)``.
        x: ``(n, ...)`` inputs.
        y: ``(n,)`` classes.
        eps: Radius :math:`\gamma` of the ``l_inf`` ball.
        steps: Ascent steps.
        seed: Seed of the random start.

    Returns:
        ``(n, 2, ...)``: ``x`` and the adversarial ``x'`` stacked on dim 1 (no gradient), as
        :class:`Paired` takes them.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        clean = model(x)
    delta = (torch.rand(x.shape, generator=g, dtype=x.dtype) * 2 - 1).to(x.device) * eps
    for _ in range(steps):
        delta.requires_grad_(True)
        pair = torch.stack([clean, model(x + delta)], 1)
        (grad,) = torch.autograd.grad(_margin_shift(pair, y).norm(dim=1).sum(), delta)
        delta = (delta.detach() + 2.5 * eps / steps * grad.sign()).clamp(-eps, eps)
    return torch.stack([x, x + delta.detach()], 1)


def _check_pairs(outputs: torch.Tensor, targets: torch.Tensor) -> None:
    """Refuse outputs that are not ``(n, 2, C)`` paired logits with ``(n,)`` class targets."""
    if outputs.dim() != 3 or outputs.shape[1] != 2 or targets.shape != outputs.shape[:1]:
        raise ValueError(
            "SmoothAdvCompSum: expects (n, 2, C) paired logits (clean, adversarial) and (n,) "
            f"classes; got {tuple(outputs.shape)} and {tuple(targets.shape)}. Wrap the model in "
            "hesse.losses.Paired and feed torch.stack([x, x_adv], 1) (adversarial_pairs)."
        )


def _margin_shift(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(n, C)``: :math:`t = D r`, :math:`r = h(x') - h(x)`, :math:`(D r)_c = r_y - r_c`."""
    r = outputs[:, 1] - outputs[:, 0]
    return r.gather(1, targets[:, None]) - r


def _shift_matrix(targets: torch.Tensor, C: int, dtype: torch.dtype) -> torch.Tensor:
    r"""``(n, C, C)``: :math:`D = \mathbf 1 e_y^\top - I` per row."""
    e = nn.functional.one_hot(targets, C).to(dtype)
    return e[:, None, :].expand(-1, C, -1) - torch.eye(C, dtype=dtype, device=targets.device)
