r"""The Z-loss (de Brébisson and Vincent 2016) and its output Hessian.

de Brébisson and Vincent 2016, "The Z-loss: a shift and scale invariant classification loss
belonging to the Spherical Family": the logits :math:`o \in \mathbb{R}^C` are standardised,
:math:`z = (o - \mu)/\sigma` with :math:`\mu` their mean and :math:`\sigma` their (population)
standard deviation, and

.. math::
    \ell(o, y) = \frac1a \operatorname{softplus}\big(a\,(b - z_y)\big).

It depends on :math:`o` only through :math:`o_y`, :math:`\sum_c o_c` and :math:`\sum_c o_c^2`
(the spherical family), so an output layer can compute it and its gradient without forming the
:math:`C` logits; this module forms them (the benchmark times both sides as C grows).

With :math:`c = P o` (:math:`P = I - \mathbf 1\mathbf 1^\top / C`), :math:`k = \sqrt C`,
:math:`s = \sigma(a(b - z_y))`, :math:`g = \nabla z_y = k(P e_y/\|c\| - c_y c/\|c\|^3)`:

.. math::
    H = a s (1 - s)\, g g^\top - s\, \nabla^2 z_y, \quad
    \nabla^2 z_y = k\Big(3 c_y \frac{c c^\top}{\|c\|^5}
      - \frac{P e_y c^\top + c e_y^\top P + c_y P}{\|c\|^3}\Big).

:math:`H\mathbf 1 = 0` (shift invariance), so the rank is at most :math:`C - 1`. Scale
invariance gives :math:`H o = -\nabla \ell` and :math:`o^\top \nabla \ell = 0`, so on the plane of
:math:`o` and :math:`\nabla \ell` the quadratic form is :math:`\begin{pmatrix} 0 & -\|\nabla\ell\|
\\ \cdot & \cdot \end{pmatrix}` (scaled), whose determinant is negative: wherever the gradient is
not zero, :math:`H` has a negative eigenvalue. At most :math:`C - 2` directions curve upward,
which is the predicted count of the *top* outliers (the digits demo shows 8 for ``C = 10``). The
loss is not convex in :math:`o`, so its GGN is not PSD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._base import OutputLoss, class_rows, format_value


@dataclass(frozen=True, repr=False)
class ZLoss(OutputLoss):
    """The Z-loss with its slope ``a`` and offset ``b``, mean over the rows.

    The paper tunes ``a`` and ``b`` per task (both on validation data); the defaults here are
    a neutral start, not the paper's values. Needs ``C >= 2`` and rows that are not constant.

    Args:
        a: Slope :math:`a > 0` of the softplus.
        b: Offset :math:`b` (the standardised score at which the loss bends).

    Example:
        >>> o, y = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([2])
        >>> bool(torch.isclose(ZLoss()(o, y), ZLoss()(10 * o + 4, y)))  # shift, scale
        True
    """

    a: float = 1.0
    b: float = 1.0
    outlier_rule = "C - 2"

    def __post_init__(self):
        if not self.a > 0:
            raise ValueError(
                f"ZLoss: a must be > 0 (the softplus slope), got {self.a!r}; the paper tunes "
                "a on validation data, 1 is a neutral start."
            )

    @property
    def spec(self) -> str:
        """``zloss:a=...,b=...``."""
        return f"zloss:a={format_value(self.a)},b={format_value(self.b)}"

    def per_sample(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        r"""``(n,)`` terms :math:`\operatorname{softplus}(a(b - z_y))/a`."""
        z_y = _standardised(outputs, targets, self.spec)[0]
        return nn.functional.softplus(self.a * (self.b - z_y)) / self.a

    def sample_hessians(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``(n, C, C)`` (see the module)."""
        z_y, c, norm = _standardised(outputs, targets, self.spec)
        n, C = outputs.shape
        k = C**0.5
        P = torch.eye(C, dtype=c.dtype, device=c.device) - 1.0 / C
        Pe = P[targets]  # rows P e_y
        c_y = c.gather(1, targets[:, None])
        g = k * (Pe / norm - c_y * c / norm**3)
        cross = Pe[:, :, None] * c[:, None, :]
        hz = k * (
            3 * c_y[:, :, None] * c[:, :, None] * c[:, None, :] / norm[:, :, None] ** 5
            - (cross + cross.transpose(1, 2) + c_y[:, :, None] * P) / norm[:, :, None] ** 3
        )
        s = torch.sigmoid(self.a * (self.b - z_y))[:, None, None]
        return self.a * s * (1 - s) * g[:, :, None] * g[:, None, :] - s * hz

    def outliers(self, n_classes: int) -> int:
        """``C - 2``: the upward directions of :math:`H` (a shift is flat, a scale bends down)."""
        return n_classes - 2


def _standardised(
    outputs: torch.Tensor, targets: torch.Tensor, who: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``z_y`` ``(n,)``, the centred logits ``c`` ``(n, C)`` and ``||c||`` ``(n, 1)``."""
    class_rows(outputs, targets, f"loss {who}")
    c = outputs - outputs.mean(1, keepdim=True)
    norm = c.norm(dim=1, keepdim=True)
    z_y = (outputs.shape[1] ** 0.5) * c.gather(1, targets[:, None])[:, 0] / norm[:, 0]
    return z_y, c, norm
