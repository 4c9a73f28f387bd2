"""AdaHessian: Adam with the Hutchinson Hessian diagonal in place of the squared gradient."""

from __future__ import annotations

import torch
from torch import nn

from ._shell import CurvatureOptimizer
from .estimators import Hutchinson, spatial_average
from .updates import adahessian_update


class AdaHessian(CurvatureOptimizer):
    r"""AdaHessian (Yao, Gholami, Shen, Mustafa, Keutzer & Mahoney 2021).

    Adam's second moment is replaced by a moving average of the squared, spatially averaged
    Hessian-diagonal estimate :math:`\bar D` (:func:`~hesse.optim.estimators.spatial_average`);
    see :func:`~hesse.optim.updates.adahessian_update` for the formula.

    Args:
        params: Parameters or parameter groups (groups may set their own ``lr`` etc.).
        lr: Learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`.
        eps: :math:`\epsilon` added to the denominator.
        weight_decay: Decoupled weight decay :math:`\lambda`.
        hessian_power: :math:`k` in :math:`(\sqrt{v})^k`, in (0, 1].
        update_every: Refresh the diagonal estimate every this many steps (1 = every step);
            the second moment advances only on refreshes.
        seed: Seed of the probe generator (its state is in ``state_dict``).
        estimator: Hessian-diagonal estimator (default ``Hutchinson()``).
        spatial_averaging: Average the estimate over convolution kernels (the paper's choice).
        model: The module that owns ``params``: the convolution weights to average are the
            weights of its ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` modules,
            found by module type, so that a ViT's ``(1, N, D)`` position embedding is not
            taken for a kernel. Without it, the 4-D parameters are (the official code's rule,
            right for ``Conv2d``): pass it for 1-D or 3-D convolutions, or for 4-D parameters
            that are not convolution weights.

    Raises:
        ValueError: a hyper-parameter out of range.

    Example:
        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
        >>> opt = AdaHessian(model.parameters(), lr=0.1, seed=0)
        >>> first = opt.step(lambda: ((model(x) - y) ** 2).mean())
        >>> for _ in range(50):
        ...     last = opt.step(lambda: ((model(x) - y) ** 2).mean())
        >>> bool(last < first)
        True
    """

    def __init__(
        self,
        params,
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        update_every: int = 1,
        seed: int = 0,
        *,
        estimator=None,
        spatial_averaging: bool = True,
        model: nn.Module | None = None,
    ):
        _check_common(lr, betas, eps, weight_decay)
        if not 0 < hessian_power <= 1:
            raise ValueError(f"AdaHessian: hessian_power must be in (0, 1], got {hessian_power}.")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, hessian_power=hessian_power
        )
        estimator = Hutchinson() if estimator is None else estimator
        super().__init__(
            params, defaults, estimator=estimator, update_every=update_every, seed=seed
        )
        self.spatial_averaging = spatial_averaging
        # id -> weight: holding the weights keeps their ids from being reused
        self._kernels = None if model is None else {id(w): w for w in _convolution_weights(model)}

    def _transform(self, estimate, p):
        return spatial_average(estimate, p) if self._is_kernel(p) else estimate

    def _is_kernel(self, p: torch.Tensor) -> bool:
        if not self.spatial_averaging:
            return False
        if self._kernels is None:  # only tensors to go by: the official code's rule
            return p.dim() == 4
        return id(p) in self._kernels

    def _update(self, p, g, d, state, group):
        hyper = {k: group[k] for k in ("lr", "betas", "eps", "weight_decay", "hessian_power")}
        return adahessian_update(p, g, d, state, **hyper)


_CONVOLUTIONS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def _convolution_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights of ``model``'s convolutions, whose dims 2, 3, ... are kernel positions."""
    return [m.weight for m in model.modules() if isinstance(m, _CONVOLUTIONS)]


def _check_common(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """Refuse hyper-parameters out of range, naming the one and its range."""
    if not lr >= 0:
        raise ValueError(f"lr must be >= 0, got {lr}.")
    if not (len(betas) == 2 and all(0 <= b < 1 for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}.")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}.")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
