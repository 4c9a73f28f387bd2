"""The contract of a loss whose Hessian in the model outputs is known in closed form."""

from __future__ import annotations

import torch


class OutputLoss:
    r"""A mean loss of ``(outputs, targets)`` that declares its Hessian in the outputs.

    A subclass computes the loss and its output Hessian :math:`H = \nabla^2_f \ell(f, y)` in
    closed form; :class:`~hesse.Objective` recognises it as it recognises torch's losses, and
    :class:`~hesse.GGNOperator` uses :meth:`hessian_product` for :math:`J^\top H J`. A loss that is
    a mean of per-sample terms (``decomposable``) implements :meth:`per_sample` and
    :meth:`sample_hessians`; the base then gives the mean, the product and the dense matrix:

    .. math::
        \ell(f, y) = \frac1n \sum_{i=1}^n \ell_i(f_i, y_i), \qquad
        H = \frac1n \operatorname{blockdiag}(H_1, \dots, H_n),
        \quad H_i = \nabla^2_{f_i} \ell_i .

    A loss of the whole batch (AnyLoss) overrides ``__call__`` and :meth:`hessian_product`.

    Attributes:
        convex: :math:`H \succeq 0` at every output, so the GGN is PSD (tagged ``psd``).
        linear: The loss is linear in the outputs (:math:`H = 0`): its GGN is zero (EnsLoss).
        decomposable: The loss is the mean of per-sample terms.
        stochastic: Each call draws a new loss (EnsLoss): no fixed function to analyse.
        outlier_rule: How :meth:`outliers` follows from the number of classes ``C``
            (``"C - 1"``), or why there is no prediction.
    """

    convex: bool = False
    linear: bool = False
    decomposable: bool = True
    stochastic: bool = False
    outlier_rule: str = "no prediction"

    @property
    def spec(self) -> str:
        """The name with its parameters, as ``--loss`` spells it (``"gce:q=0.7"``)."""
        raise NotImplementedError(f"{type(self).__name__}: an OutputLoss must define spec.")

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss over the batch (a scalar)."""
        return self.per_sample(outputs, targets).mean()

    def per_sample(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        r"""``(n,)`` per-sample terms :math:`\ell_i` whose mean is the loss."""
        raise NotImplementedError(f"{self.spec}: the loss is not a mean of per-sample terms.")

    def sample_hessians(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        r"""``(n, K, K)``: the Hessian of each term :math:`\ell_i` in its output row ``f_i``."""
        raise NotImplementedError(f"{self.spec}: the loss is not a mean of per-sample terms.")

    def hessian_product(
        self, outputs: torch.Tensor, targets: torch.Tensor, V: torch.Tensor
    ) -> torch.Tensor:
        """:math:`H V` for the Hessian of the mean loss in the outputs.

        Args:
            outputs: ``(n, ...)`` model outputs.
            targets: ``(n,)`` targets.
            V: Shaped like ``outputs``, or ``(k, *outputs.shape)`` for ``k`` directions.

        Returns:
            Shaped like ``V``.
        """
        H = self.sample_hessians(outputs, targets)
        n = outputs.shape[0]
        rows = V.reshape(*V.shape[: V.dim() - outputs.dim()], n, -1)
        return (torch.einsum("nij,...nj->...ni", H, rows) / n).reshape(V.shape)

    def hessian(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``(N, N)`` dense Hessian of the mean loss in ``outputs.reshape(-1)`` (``N = numel``)."""
        N = outputs.numel()
        eye = torch.eye(N, dtype=outputs.dtype, device=outputs.device)
        return self.hessian_product(outputs, targets, eye.reshape(N, *outputs.shape)).reshape(N, N)

    def outliers(self, n_classes: int) -> int | None:
        r"""How many outliers above the bulk the GGN of a trained classifier predicts.

        The number of directions in which the output Hessian curves upward (its rank, for a
        convex loss): the GGN
        :math:`\frac1n\sum_i J_i^\top H_i J_i` takes its large eigenvalues from the class
        means of :math:`J_i^\top H_i^{1/2}`, one per direction in which :math:`H_i` curves up
        (Papyan 2020, "Traces of class/cross-class structure pervade deep learning spectra").
        None where the loss makes no prediction.
        """
        return None

    def __repr__(self) -> str:
        return f"hesse.losses[{self.spec}]"


def class_rows(outputs: torch.Tensor, targets: torch.Tensor, who: str) -> None:
    """Refuse outputs that are not ``(n, C)`` logits with ``(n,)`` integer class targets."""
    if outputs.dim() != 2 or targets.shape != outputs.shape[:1] or targets.is_floating_point():
        raise ValueError(
            f"{who}: expects (n, C) logits and (n,) integer class targets; got outputs of shape "
            f"{tuple(outputs.shape)} and targets of shape {tuple(targets.shape)} "
            f"({targets.dtype}). Flatten extra dims into rows (logits.reshape(-1, C))."
        )


def binary_rows(outputs: torch.Tensor, targets: torch.Tensor, who: str) -> torch.Tensor:
    """The ``(n,)`` logits of a binary loss from ``(n,)`` or ``(n, 1)`` outputs; checks targets.

    Raises:
        ValueError: other shapes, or targets other than 0 and 1.
    """
    n = targets.shape[0] if targets.dim() else -1
    if outputs.shape not in ((n,), (n, 1)) or targets.dim() != 1:
        raise ValueError(
            f"{who}: expects one logit per sample, (n,) or (n, 1) outputs with (n,) targets in "
            f"{{0, 1}}; got outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)}."
        )
    if bool(((targets != 0) & (targets != 1)).any()):
        raise ValueError(f"{who}: targets must be 0 or 1 (the positive class is 1).")
    return outputs.reshape(-1)


def format_value(x: float) -> str:
    """A parameter as ``--loss`` spells it: ``0.7``, ``1``, ``73``."""
    return f"{x:g}"
