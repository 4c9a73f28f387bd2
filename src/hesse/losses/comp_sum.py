r"""Comp-sum losses (Mao, Mohri and Zhong 2023) and their output Hessians.

Mao, Mohri and Zhong 2023, "Cross-Entropy Loss Functions: Theoretical Analysis and
Applications" (ICML): for logits :math:`h \in \mathbb{R}^C` and the class :math:`y`,

.. math::
    \ell_\tau(h, y) = \Phi^\tau\Big(\sum_{y' \ne y} e^{h_{y'} - h_y}\Big), \qquad
    \Phi^\tau(u) = \begin{cases} \log(1 + u) & \tau = 1 \\
    \frac{(1 + u)^{1 - \tau} - 1}{1 - \tau} & \tau \ne 1, \end{cases}

and since :math:`1/(1 + u) = p_y = \operatorname{softmax}(h)_y`,
:math:`\ell_\tau = g_\tau(\log p_y)` with
:math:`g_\tau(s) = (e^{(\tau - 1) s} - 1) / (1 - \tau)`. Members: :math:`\tau = 0` the sum
exponential loss, :math:`\tau = 1` cross-entropy, :math:`\tau \in (1, 2)` generalized
cross-entropy with :math:`q = \tau - 1` (Zhang and Sabuncu 2018), :math:`\tau = 2` the mean
absolute error :math:`1 - p_y` (half of :math:`\|e_y - p\|_1`, the form of Ghosh et al. 2017).

The output Hessian, with :math:`d = e_y - p` and :math:`S = \operatorname{diag}(p) - p p^\top`:

.. math::
    H = p_y^{\tau - 1} \big(S - (\tau - 1)\, d d^\top\big).

:math:`H \mathbf{1} = 0` (softmax ignores a shift), so the rank is at most :math:`C - 1`: the
predicted outlier count. For :math:`\tau \le 1` both parts are PSD (the loss is convex in the
logits); for :math:`\tau > 1` (GCE, MAE) :math:`H` is indefinite where :math:`p_y` is small, so
their GGN is not PSD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._base import OutputLoss, class_rows, format_value


@dataclass(frozen=True, repr=False)
class CompSum(OutputLoss):
    r"""The comp-sum loss :math:`\ell_\tau` (see the module), mean over the rows.

    Args:
        tau: :math:`\tau \ge 0`.

    Example:
        >>> h, y = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
        >>> p = torch.softmax(h, 1)[0, 0]
        >>> bool(torch.isclose(CompSum(2.0)(h, y), 1 - p)), CompSum(0.5).convex, gce(0.7).spec
        (True, True, 'gce:q=0.7')
    """

    tau: float = 1.0
    outlier_rule = "C - 1"

    def __post_init__(self):
        if not self.tau >= 0:
            raise ValueError(f"CompSum: tau must be >= 0 (Mao et al. 2023), got {self.tau!r}.")

    @property
    def convex(self) -> bool:  # type: ignore[override]
        r"""Convex in the logits for :math:`\tau \le 1`."""
        return self.tau <= 1

    @property
    def spec(self) -> str:
        """``sum_exp``, ``cross_entropy``, ``gce:q=...``, ``mae`` or ``comp_sum:tau=...``."""
        names = {0.0: "sum_exp", 1.0: "cross_entropy", 2.0: "mae"}
        if self.tau in names:
            return names[self.tau]
        if 1 < self.tau < 2:
            return f"gce:q={format_value(self.tau - 1)}"
        return f"comp_sum:tau={format_value(self.tau)}"

    def per_sample(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        r"""``(n,)`` terms :math:`g_\tau(\log p_{y_i})`."""
        class_rows(outputs, targets, f"loss {self.spec}")
        s = torch.log_softmax(outputs, 1).gather(1, targets[:, None])[:, 0]
        if self.tau == 1:
            return -s
        return torch.expm1((self.tau - 1) * s) / (1 - self.tau)

    def sample_hessians(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        r"""``(n, C, C)``: :math:`p_y^{\tau-1}(S - (\tau - 1) d d^\top)` per row."""
        class_rows(outputs, targets, f"loss {self.spec}")
        p = torch.softmax(outputs, 1)
        d = nn.functional.one_hot(targets, p.shape[1]).to(p.dtype) - p
        S = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        scale = p.gather(1, targets[:, None])[:, 0] ** (self.tau - 1)
        return scale[:, None, None] * (S - (self.tau - 1) * d[:, :, None] * d[:, None, :])

    def outliers(self, n_classes: int) -> int:
        """``C - 1`` (the rank of :math:`H`)."""
        return n_classes - 1


def gce(q: float = 0.7) -> CompSum:
    r"""Generalized cross-entropy :math:`(1 - p_y^q)/q` (Zhang and Sabuncu 2018).

    It is the comp-sum loss with :math:`\tau = 1 + q`; ``q`` in (0, 1], the paper's default
    0.7; ``q -> 0`` is cross-entropy, ``q = 1`` MAE.
    """
    if not 0 < q <= 1:
        raise ValueError(f"gce: q must be in (0, 1] (Zhang and Sabuncu 2018), got {q!r}.")
    return CompSum(1.0 + q)


sum_exp = CompSum(0.0)
r"""The sum exponential loss :math:`\sum_{y' \ne y} e^{h_{y'} - h_y}` (:math:`\tau = 0`)."""
cross_entropy = CompSum(1.0)
r"""Cross-entropy :math:`-\log p_y` (:math:`\tau = 1`); ``Objective`` runs it as torch's."""
mae = CompSum(2.0)
r"""Mean absolute error :math:`1 - p_y` (:math:`\tau = 2`), robust to label noise."""
