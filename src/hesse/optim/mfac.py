"""M-FAC: steps preconditioned by the inverse empirical Fisher of the last ``m`` gradients."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..operators.woodbury import WoodburyFisher
from . import _closure


class MFAC(torch.optim.Optimizer):
    r"""M-FAC (Frantar, Kurtic & Alistarh 2021), the dynamic algorithm with SGD on top.

    .. math::
        F_t = \lambda I + \frac1m \sum_{j=t-m+1}^{t} g_j g_j^\top, \qquad
        u_t = F_t^{-1} g_t, \qquad
        b_t = \mu b_{t-1} + u_t + \lambda_{wd}\theta_t, \qquad
        \theta_{t+1} = \theta_t - \eta\, b_t

    :math:`F_t^{-1} g_t` is exact, from the Woodbury identity on the window of the last ``m``
    gradients (:class:`hesse.WoodburyFisher`: ``O(m d)`` per step, nothing ``d x d``). The
    Fisher is over all parameters of all groups together; each group's ``lr``, ``momentum``
    and ``weight_decay`` apply to its own slice of :math:`u_t`. A parameter without a gradient
    (the loss does not reach it) holds zeros in the window and is not stepped, as in
    ``torch.optim``.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate :math:`\eta`.
        m: Window: gradients kept.
        damping: :math:`\lambda > 0` (absolute).
        momentum: :math:`\mu`.
        weight_decay: :math:`\lambda_{wd}` (added to the preconditioned direction).

    Raises:
        ValueError: ``m < 1`` or damping not positive.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = MFAC(model.parameters(), lr=1e-3, m=4, damping=1e-2)
        >>> x = torch.randn(8, 3)
        >>> loss = opt.step(lambda: model(x).square().mean())
        >>> opt.fisher.m
        1
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        m: int = 256,
        damping: float = 1e-5,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ):
        if m < 1 or not damping > 0:
            raise ValueError(f"MFAC: need m >= 1 and damping > 0, got m={m}, damping={damping}.")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.m, self.damping = int(m), float(damping)
        self.fisher: WoodburyFisher | None = None

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    # torch's stub types the closure's loss as a float; it is a tensor, as in torch.optim
    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """One step; with a closure (returns the loss, or calls backward) or with ``.grad`` set.

        Returns:
            The closure's loss (detached), or None without a closure.

        Raises:
            ValueError: no closure and no ``.grad``, or a closure that returns no loss.
        """
        params = self._params()
        if closure is None:
            if all(p.grad is None for p in params):
                raise ValueError(
                    "MFAC.step: no gradient; pass a closure that returns the loss, or call "
                    "loss.backward() before step()."
                )
            loss, grads = None, [p.grad for p in params]
        else:
            loss, grads = _closure.first_order(closure, params, "MFAC")
        # a parameter without a gradient holds zeros in the window (the Fisher keeps its
        # dimensions) and is not stepped
        dense = [
            torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, grads, strict=True)
        ]
        g = torch.cat([gi.reshape(-1) for gi in dense])
        if self.fisher is None:
            empty = g.new_zeros((0, g.numel()))
            self.fisher = WoodburyFisher(empty, self.damping, window=self.m)
        u = self.fisher.update(g).inverse() @ g
        self._descend(u, grads)
        return None if loss is None else loss.detach()

    def _descend(self, u: torch.Tensor, grads: list[torch.Tensor | None]) -> None:
        groups = [group for group in self.param_groups for p in group["params"] if p.requires_grad]
        pieces = u.split([p.numel() for p in self._params()])
        for p, g, u_p, group in zip(self._params(), grads, pieces, groups, strict=True):
            if g is None:  # as torch.optim: no gradient, no update and no state
                continue
            step = u_p.view_as(p) + group["weight_decay"] * p
            if group["momentum"]:
                buf = self.state[p].get("momentum_buffer")
                step = step if buf is None else group["momentum"] * buf + step
                self.state[p]["momentum_buffer"] = step.clone()
            p.sub_(group["lr"] * step)

    def state_dict(self) -> dict:
        """The torch state plus the window of gradients (its exact Gram matrix too)."""
        out = super().state_dict()
        out["hesse"] = {"fisher": None if self.fisher is None else self.fisher.state_dict()}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what :meth:`state_dict` saved, the gradient window included."""
        state_dict = dict(state_dict)
        if "hesse" not in state_dict:
            raise ValueError(
                "MFAC.load_state_dict: the state has no 'hesse' entry (the gradient window); "
                "pass a dict from MFAC.state_dict(), not from another optimizer."
            )
        fisher = state_dict.pop("hesse")["fisher"]
        super().load_state_dict(state_dict)
        self.fisher = None if fisher is None else WoodburyFisher.from_state_dict(fisher)
