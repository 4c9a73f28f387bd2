"""Sophia: clipped steps preconditioned by a Hessian-diagonal estimate (SophiaH, SophiaG)."""

from __future__ import annotations

from ._shell import CurvatureOptimizer
from .adahessian import _check_common
from .estimators import GaussNewtonBartlett, Hutchinson
from .updates import sophia_update


class Sophia(CurvatureOptimizer):
    r"""Sophia (Liu, Li, Hall, Liang & Ma 2024) with any Hessian-diagonal estimator.

    The update is :func:`~hesse.optim.updates.sophia_update`: every coordinate moves by at most
    ``lr`` (plus the decay), and coordinates whose estimate is not positive take a sign step.
    :class:`SophiaH` (Hutchinson) and :class:`SophiaG` (Gauss-Newton-Bartlett) fix the
    estimator.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate :math:`\eta`, the largest step per coordinate.
        betas: :math:`(\beta_1, \beta_2)` of the gradient and estimate moving averages.
        rho: :math:`\rho` (the paper's :math:`\gamma`): the step is
            :math:`\min(|m| / (\rho h), 1)\, \eta`.
        weight_decay: Decoupled weight decay :math:`\lambda`.
        update_every: :math:`k`: refresh the estimate every ``k`` steps (from step 0).
        seed: Seed of the probes or sampled labels (their generator is in ``state_dict``).
        estimator: ``Hutchinson()`` or ``GaussNewtonBartlett()`` (or your own).
        eps: :math:`\epsilon` in :math:`\max(\rho h, \epsilon)`.

    Raises:
        ValueError: a hyper-parameter out of range.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        update_every: int = 10,
        seed: int = 0,
        *,
        estimator,
        eps: float = 1e-12,
    ):
        _check_common(lr, betas, eps, weight_decay)
        if not rho > 0:
            raise ValueError(f"{type(self).__name__}: rho must be > 0, got {rho}.")
        defaults = dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps)
        super().__init__(
            params, defaults, estimator=estimator, update_every=update_every, seed=seed
        )

    def _update(self, p, g, h_hat, state, group):
        hyper = {k: group[k] for k in ("lr", "betas", "rho", "weight_decay", "eps")}
        return sophia_update(p, g, h_hat, state, **hyper)


class SophiaH(Sophia):
    r"""Sophia with Hutchinson's :math:`u \odot Hu` (the official code ships only SophiaG).

    The closure returns the loss. Arguments as :class:`Sophia`, plus:

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate, the largest step per coordinate.
        probes: Rademacher probes per refresh of the estimate.
        **kwargs: ``betas``, ``rho``, ``weight_decay``, ``update_every``, ``seed``, ``eps``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = SophiaH(model.parameters(), lr=0.01, update_every=2)
        >>> x = torch.randn(8, 3)
        >>> before = model.weight.detach().clone()
        >>> _ = opt.step(lambda: model(x).square().mean())
        >>> bool(((model.weight - before).abs() <= 0.01 * (1 + 0.1 * before.abs()) + 1e-7).all())
        True
    """

    def __init__(self, params, lr: float = 1e-4, *, probes: int = 1, **kwargs):
        super().__init__(params, lr, estimator=Hutchinson(probes=probes), **kwargs)


class SophiaG(Sophia):
    r"""Sophia with the Gauss-Newton-Bartlett estimate (sampled labels; cross-entropy models).

    The closure returns ``(loss, logits)``; logits ``(..., classes)`` for the rows that count
    (for a language model with padding, ``logits[targets != -100]``).

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate, the largest step per coordinate.
        **kwargs: ``betas``, ``rho``, ``weight_decay``, ``update_every``, ``seed``, ``eps``.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> opt = SophiaG(model.parameters(), lr=0.01)
        >>> def closure():
        ...     logits = model(x)
        ...     return F.cross_entropy(logits, y), logits
        >>> loss = opt.step(closure)
    """

    def __init__(self, params, lr: float = 1e-4, **kwargs):
        super().__init__(params, lr, estimator=GaussNewtonBartlett(), **kwargs)
