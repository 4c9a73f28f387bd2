r"""AnyLoss (Han, Moniz and Chawla 2024): confusion-matrix metrics as losses, and their Hessian.

Han, Moniz and Chawla 2024, "AnyLoss: Transforming Classification Metrics into Loss Functions"
(KDD): the probability :math:`p_i = \sigma(o_i)` of a binary classifier is amplified by the
approximation function

.. math::
    A(p) = \frac{1}{1 + e^{-L (p - 1/2)}}

(:math:`L` the amplifying scale; the paper uses :math:`L = 73`), and :math:`a_i = A(p_i)` fill a
differentiable confusion matrix of the batch, :math:`TP = \sum y_i a_i`, :math:`FP = \sum (1 -
y_i) a_i`, :math:`FN = P - TP`, :math:`TN = N - FP` (:math:`P`, :math:`N` the positives and
negatives of the batch). The loss is :math:`1 - m(TP, FP)` for the metric :math:`m`:
accuracy :math:`(TP + TN)/n`, :math:`F_\beta = (1 + \beta^2) TP / (TP + \beta^2 P + FP)`,
G-mean :math:`\sqrt{TP \cdot TN / (P N)}`, balanced accuracy :math:`(TP/P + TN/N)/2`.

The loss is of the whole batch, not a mean of per-sample terms. With :math:`u = y \odot a'`,
:math:`v = (1 - y) \odot a'` (:math:`a' = da/do`) its Hessian in the logits is a rank-2
coupling of the samples plus a diagonal:

.. math::
    H = -\big(m_{TT} u u^\top + m_{TF} (u v^\top + v u^\top) + m_{FF} v v^\top\big)
        - \operatorname{diag}\big((m_T y + m_F (1 - y)) \odot a''\big).

Accuracy and balanced accuracy are linear in :math:`(TP, FP)` (no coupling); :math:`F_\beta` and
G-mean are not. :math:`a''` changes sign at :math:`a = 1/2`, so no metric is convex in the logits
and the GGN is not PSD. As :class:`~hesse.Objective` weights batch means by their rows, the
objective over several batches is the mean of the batch metrics, not the metric of all data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._base import OutputLoss, binary_rows, format_value

METRICS = ("accuracy", "f_beta", "g_mean", "balanced_accuracy")


@dataclass(frozen=True, repr=False)
class AnyLoss(OutputLoss):
    r"""``1 - metric`` of the batch's approximated confusion matrix (see the module).

    Args:
        metric: ``"accuracy"``, ``"f_beta"``, ``"g_mean"`` or ``"balanced_accuracy"``.
        beta: :math:`\beta` of :math:`F_\beta` (1: F1).
        L: Amplifying scale :math:`L > 0` of the approximation function (paper: 73).

    Outputs are one logit per sample, ``(n,)`` or ``(n, 1)``; targets ``(n,)`` in {0, 1}. F-beta
    needs a positive in the batch; G-mean and balanced accuracy need both classes.

    Example:
        >>> o, y = torch.tensor([9.0, -9.0, 9.0]), torch.tensor([1, 0, 0])
        >>> round(float(AnyLoss("accuracy")(o, y)), 3)  # one error in three
        0.333
    """

    metric: str = "f_beta"
    beta: float = 1.0
    L: float = 73.0
    decomposable = False

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"AnyLoss: metric must be one of {METRICS}, got {self.metric!r}.")
        if not (self.L > 0 and self.beta > 0):
            raise ValueError(f"AnyLoss: L and beta must be > 0, got {self.L!r}, {self.beta!r}.")

    @property
    def spec(self) -> str:
        """``anyloss:metric=...,L=...`` (with ``beta=`` for F-beta)."""
        beta = f",beta={format_value(self.beta)}" if self.metric == "f_beta" else ""
        return f"anyloss:metric={self.metric}{beta},L={format_value(self.L)}"

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The scalar :math:`1 - m(TP, FP)` of the batch."""
        y, a = self._approximate(outputs, targets)[:2]
        TP, FP = (y * a).sum(), ((1 - y) * a).sum()
        return 1 - self._metric(TP, FP, y)[0]

    def hessian_product(
        self, outputs: torch.Tensor, targets: torch.Tensor, V: torch.Tensor
    ) -> torch.Tensor:
        """:math:`H V` for ``V`` shaped like ``outputs`` or ``(k, *outputs.shape)``."""
        y, a, a1, a2 = self._approximate(outputs, targets)
        TP, FP = (y * a).sum(), ((1 - y) * a).sum()
        _, (mT, mF), (mTT, mTF, mFF) = self._metric(TP, FP, y)
        u, v = y * a1, (1 - y) * a1
        rows = V.reshape(*V.shape[: V.dim() - outputs.dim()], -1)
        uV, vV = rows @ u, rows @ v
        low = (mTT * uV + mTF * vV)[..., None] * u + (mTF * uV + mFF * vV)[..., None] * v
        return -(low + (mT * y + mF * (1 - y)) * a2 * rows).reshape(V.shape)

    @property
    def outlier_rule(self) -> str:  # type: ignore[override]
        """``1`` (one logit) without coupling, ``2`` with the rank-2 coupling of the batch."""
        return "1 (one logit)" if self.outliers(2) == 1 else "2 (the rank-2 batch coupling)"

    def outliers(self, n_classes: int) -> int:
        """1 for the metrics linear in the confusion matrix, 2 for F-beta and G-mean."""
        return 1 if self.metric in ("accuracy", "balanced_accuracy") else 2

    def _approximate(self, outputs: torch.Tensor, targets: torch.Tensor):
        """``y`` and :math:`a`, :math:`a'`, :math:`a''` per sample, all ``(n,)``."""
        o = binary_rows(outputs, targets, f"loss {self.spec}")
        y = targets.to(o.dtype)
        self._check_classes(y)
        p = torch.sigmoid(o)
        p1, a = p * (1 - p), torch.sigmoid(self.L * (p - 0.5))
        p2, a_p = p1 * (1 - 2 * p), self.L * a * (1 - a)
        a_pp = self.L * a_p * (1 - 2 * a)
        return y, a, a_p * p1, a_pp * p1**2 + a_p * p2

    def _check_classes(self, y: torch.Tensor) -> None:
        P, n = float(y.sum()), y.numel()
        needs_both = self.metric in ("g_mean", "balanced_accuracy")
        if P == 0 or (needs_both and P == n):
            raise ValueError(
                f"AnyLoss({self.metric}): a batch of {n} samples with {int(P)} positives; the "
                f"metric needs {'both classes' if needs_both else 'a positive'} in every batch. "
                "Use larger or stratified batches."
            )

    def _metric(self, TP, FP, y):
        """:math:`m`, its gradient and Hessian entries in :math:`(TP, FP)`."""
        n, P = y.numel(), y.sum()
        N = n - P
        if self.metric == "accuracy":
            return (TP + N - FP) / n, (1 / n, -1 / n), (0.0, 0.0, 0.0)
        if self.metric == "balanced_accuracy":
            return (TP / P + (N - FP) / N) / 2, (1 / (2 * P), -1 / (2 * N)), (0.0, 0.0, 0.0)
        if self.metric == "f_beta":
            k, B = 1 + self.beta**2, self.beta**2 * P
            D = TP + B + FP
            grad = (k * (B + FP) / D**2, -k * TP / D**2)
            hess = (-2 * k * (B + FP) / D**3, k / D**2 - 2 * k * (B + FP) / D**3, 2 * k * TP / D**3)
            return k * TP / D, grad, hess
        r = TP * (N - FP) / (P * N)  # g_mean = sqrt(r)
        rT, rF, rTF = (N - FP) / (P * N), -TP / (P * N), -1 / (P * N)
        m = r.sqrt()
        grad = (rT / (2 * m), rF / (2 * m))
        hess = (-(rT**2) / (4 * m**3), rTF / (2 * m) - rT * rF / (4 * m**3), -(rF**2) / (4 * m**3))
        return m, grad, hess
