"""SAM and ASAM: a gradient step taken from the worst nearby point."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import _closure
from .updates import sam_perturbation


class SAM(torch.optim.Optimizer):
    r"""Sharpness-Aware Minimization around any base optimizer; ASAM with ``adaptive=True``.

    Each step evaluates the gradient at :math:`\theta`, moves to :math:`\theta + \epsilon`
    (:func:`~hesse.optim.updates.sam_perturbation`: :math:`\|T^{-1}\epsilon\| = \rho`),
    evaluates the gradient there, returns to :math:`\theta` exactly (a saved copy, not a
    subtraction) and lets the base optimizer step with the second gradient. A parameter that
    the loss does not reach is neither perturbed nor stepped: its ``.grad`` stays None, so the
    base optimizer skips it (no momentum, no weight decay), as ``torch.optim`` does.

    The closure either returns the loss (differentiated here), or calls ``backward()`` itself;
    in the second form it may loop over micro-batches (gradient accumulation): both passes
    then see the whole batch, and the perturbation uses the accumulated gradient. The ascent
    is computed in float32 or wider outside autocast, so a closure under
    ``torch.autocast("cpu", dtype=torch.bfloat16)`` works unchanged.

    Args:
        params: Parameters or parameter groups (each group may set its own ``rho``, ``lr``).
        base_optimizer: A ``torch.optim.Optimizer`` class, built on the same parameter groups.
        rho: Radius :math:`\rho` of the ascent step.
        adaptive: ASAM (scale-invariant ascent, :math:`T = |\theta|`).
        **kwargs: The base optimizer's arguments (``lr``, ``momentum``, ...).

    Raises:
        ValueError: ``rho`` not positive.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> loss = opt.step(lambda: ((model(x) - y) ** 2).mean())
    """

    def __init__(
        self,
        params,
        base_optimizer=torch.optim.SGD,
        rho: float = 0.05,
        adaptive: bool = False,
        **kwargs,
    ):
        if not rho > 0:
            raise ValueError(f"SAM: rho must be > 0, got {rho}.")
        super().__init__(params, dict(rho=rho, **kwargs))
        self.adaptive = adaptive
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    @torch.no_grad()
    def first_step(self, grads: list[torch.Tensor | None]) -> None:
        r"""Move every parameter to :math:`\theta + \epsilon`, saving :math:`\theta`.

        Args:
            grads: The gradient at :math:`\theta`, one tensor per parameter in group order;
                None for a parameter that the loss does not reach (it is not moved).
        """
        params = self._params()
        rhos = [g["rho"] for g in self.param_groups for p in g["params"] if p.requires_grad]
        device = params[0].device.type
        live = [i for i, (_, g) in enumerate(zip(params, grads, strict=True)) if g is not None]
        params, rhos = [params[i] for i in live], [rhos[i] for i in live]
        reached = [g for g in grads if g is not None]  # the gradients of params
        with torch.autocast(device, enabled=False):
            eps = sam_perturbation(params, reached, rhos, adaptive=self.adaptive)
        for p, e in zip(params, eps, strict=True):
            self.state[p]["old_p"] = p.detach().clone()
            p.add_(e.to(p.dtype))

    @torch.no_grad()
    def second_step(self, grads: list[torch.Tensor | None]) -> None:
        """Return to the saved parameters and step the base optimizer with ``grads``.

        A parameter whose gradient is None keeps ``.grad = None``, so that the base optimizer
        skips it (no momentum, no weight decay), as ``torch.optim`` does.
        """
        for p, g in zip(self._params(), grads, strict=True):
            if p in self.state:  # only the parameters that first_step moved
                p.copy_(self.state.pop(p)["old_p"])
            p.grad = g
        self.base_optimizer.step()

    # torch's stub types the closure's loss as a float; it is a tensor, as in torch.optim
    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> torch.Tensor:  # type: ignore[override]
        """One SAM step; returns the loss at the unperturbed parameters (detached)."""
        params = self._params()
        loss, grads = _closure.first_order(closure, params, "SAM")
        self.first_step(grads)
        _, perturbed = _closure.first_order(closure, params, "SAM")
        self.second_step(perturbed)
        return loss.detach()

    def state_dict(self) -> dict:
        """The base optimizer's state (the perturbation lives only within a step)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load the base optimizer's state; the groups stay shared with it."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
