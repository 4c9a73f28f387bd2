r"""The squared error (torch's ``mse_loss``) and the negative log-likelihood as output losses.

They declare the curvature of torch's ``mse_loss`` and ``nll_loss`` for the objective, which runs
torch's own functions; :class:`SquaredError` is also a loss of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._base import OutputLoss


@dataclass(frozen=True, repr=False)
class SquaredError(OutputLoss):
    r"""torch's ``mse_loss`` (mean over every element) on ``(n, K)`` outputs and targets.

    .. math::
        \ell = \frac{1}{nK} \sum_{i,k} (f_{ik} - t_{ik})^2, \qquad H_i = \frac{2}{K} I_K,

    convex; full rank, so it predicts ``C`` outliers for ``C = K`` one-hot classes (Papyan 2020).

    Example:
        >>> f, t = torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
        >>> float(SquaredError()(f, t)), float(SquaredError().sample_hessians(f, t)[0, 0, 0])
        (1.0, 0.6666666666666666)
    """

    convex = True
    outlier_rule = "C"

    @property
    def spec(self) -> str:
        """``mse``."""
        return "mse"

    def per_sample(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        r"""``(n,)`` terms :math:`\|f_i - t_i\|^2 / K`."""
        return (outputs - targets).reshape(outputs.shape[0], -1).pow(2).mean(1)

    def sample_hessians(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``(n, K, K)``: :math:`2 I / K`."""
        n, K = outputs.shape[0], outputs[0].numel()
        eye = torch.eye(K, dtype=outputs.dtype, device=outputs.device)
        return (2.0 / K) * eye.expand(n, K, K)

    def outliers(self, n_classes: int) -> int:
        """``C``."""
        return n_classes


class _NLL(OutputLoss):
    """torch's ``nll_loss``: linear in its inputs (log-probabilities), so :math:`H = 0`."""

    convex = True
    linear = True
    outlier_rule = "C - 1 (NLL of a log-softmax is cross-entropy)"

    @property
    def spec(self) -> str:
        """``nll``."""
        return "nll"

    def outliers(self, n_classes: int) -> int:
        """``C - 1``: the model's log-softmax and the NLL make cross-entropy."""
        return n_classes - 1


nll_curvature = _NLL()
"""The curvature declaration of torch's ``nll_loss``."""
