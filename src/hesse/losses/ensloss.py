r"""EnsLoss (Wang and Shen 2024): an ensemble of calibrated losses drawn during training.

Wang and Shen 2024, "EnsLoss: Stochastic Calibrated Loss Ensembles for Preventing Overfitting
in Classification": a convex margin loss :math:`\phi(z)`, :math:`z = \tilde y f(x)` with
:math:`\tilde y = 2y - 1 \in \{-1, 1\}`, is classification-calibrated iff it is differentiable
at 0 with :math:`\phi'(0) < 0` (Bartlett, Jordan and McAuliffe 2006). Instead of fixing
:math:`\phi`, each step draws the loss-derivatives of the batch at random under those
conditions and descends

.. math::
    \ell(f, y) = \frac1n \sum_i g_i\, z_i, \qquad g \text{ held fixed (no gradient)},

so that the gradient is :math:`\frac1n \sum_i g_i \nabla z_i`. The draw: :math:`n` standard
normals mapped by the inverse Box-Cox transform (:math:`\lambda = 0`: :math:`e^x`), negated and
sorted, so that the smallest margin gets the most negative derivative (a non-decreasing
:math:`\phi'`: convexity); clipped at :math:`-1`; divided by :math:`z` where :math:`z > 1` (a
fading tail); shifted by :math:`-10^{-6}` (every :math:`g_i < 0`: calibration), as in the
authors' code.

Curvature: the loss of one step is *linear* in the outputs, so its output Hessian, and with
it the GGN, is zero; the ensemble's curvature belongs to no single step. And as every call
draws anew, it is no fixed function of the parameters: :class:`~hesse.Objective` refuses it
(a Lanczos run on products that change between calls would return noise). Train with it, then
analyse the trained model with a fixed calibrated loss (the logistic loss,
``F.binary_cross_entropy_with_logits``); ``benchmarks/losses`` does that.
"""

from __future__ import annotations

import torch

from ._base import OutputLoss, binary_rows, format_value


class EnsLoss(OutputLoss):
    r"""A fresh random calibrated loss at every call: a callable for a training loop.

    Args:
        seed: Seed of the draws; the ``t``-th call after construction draws the same numbers
            for the same seed.
        lam: Box-Cox :math:`\lambda \ge 0` of the inverse transform (0: exponential).

    Outputs are one logit per sample, ``(n,)`` or ``(n, 1)``; targets ``(n,)`` in {0, 1}.

    Example:
        >>> loss = EnsLoss(seed=0)
        >>> f = torch.tensor([2.0, -1.0, 0.5], requires_grad=True)
        >>> loss(f, torch.tensor([1, 1, 0])).backward()
        >>> bool((f.grad * torch.tensor([1, 1, -1]) < 0).all())  # every margin is pushed up
        True
    """

    convex = True
    linear = True
    stochastic = True
    outlier_rule = "no prediction (the output Hessian of each step is 0)"

    def __init__(self, *, seed: int = 0, lam: float = 0.0):
        if not lam >= 0:
            raise ValueError(f"EnsLoss: lam must be >= 0, got {lam!r}.")
        self.seed, self.lam = seed, lam
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def spec(self) -> str:
        """``ensloss:seed=...`` (with ``lam=`` when not 0)."""
        lam = f",lam={format_value(self.lam)}" if self.lam else ""
        return f"ensloss:seed={self.seed}{lam}"

    def per_sample(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``(n,)`` terms :math:`g_i z_i` with freshly drawn :math:`g` (advances the generator)."""
        f = binary_rows(outputs, targets, f"loss {self.spec}")
        z = (2 * targets.to(f.dtype) - 1) * f
        return self.derivatives(z.detach()) * z

    def derivatives(self, z: torch.Tensor) -> torch.Tensor:
        """``(n,)`` random calibrated loss-derivatives :math:`g` at the margins ``z``."""
        x = torch.randn(z.shape, generator=self.generator, dtype=torch.float64)
        if self.lam == 0:
            g = -torch.exp(x)
        else:
            g = -((1 + self.lam * x).clamp_min(0) ** (1 / self.lam))
        g = g.sort().values.clamp_min(-1.0).to(device=z.device, dtype=z.dtype)
        out = torch.empty_like(z)
        out[z.argsort()] = g
        tail = z > 1
        out[tail] = out[tail] / z[tail]
        return out - 1e-6

    def sample_hessians(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Zero: each step's loss is linear in the outputs."""
        n = outputs.shape[0]
        return outputs.new_zeros(n, 1, 1)

    def outliers(self, n_classes: int) -> None:
        """No prediction: the GGN of each step is zero."""
        return None
