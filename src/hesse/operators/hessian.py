"""The Hessian of an Objective's mean loss as an operator (forward-over-reverse products)."""

from __future__ import annotations

import warnings

import torch
from torch.func import grad, jvp, vmap

from ..problem.objective import Batch, Objective
from ._autograd import (
    Tangents,
    backward_columns,
    leaf_params,
)
from .base import SYMMETRIC
from .model import ModelOperator


class HessianOperator(ModelOperator):
    r"""The Hessian of the mean loss, :math:`H = \nabla^2_\theta L(\theta)`.

    ``mode="reverse"`` (the default through ``"auto"``) differentiates the gradient again
    (double backward; Pearlmutter 1994, "Fast exact multiplication by the Hessian"). Its first
    pass over the data keeps each batch's gradient graph while their saved tensors total at
    most ``max_cache_bytes``; when every batch fits, later products only run the second
    backward through the kept graphs, about a third of the cost of a fresh product (the graphs
    are dropped when the parameters change in place; a warning says once when they do not
    fit). ``mode="forward"`` uses forward-over-reverse differentiation (``torch.func.jvp`` of
    ``grad``, vectorized over columns with ``vmap``), never cached.

    Args:
        objective: The loss, model and data.
        mode: ``"auto"``, ``"reverse"`` or ``"forward"``.
        block_size: Most columns pushed through the model at once.
        max_cache_bytes: Memory cap of the kept graphs: bytes, 0 (keep none), or ``"auto"``
            (half of the memory free when they are built).

    Attributes:
        cache_bytes: Bytes the kept graphs hold (0 when none are kept).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hesse import Objective
        >>> model = nn.Linear(2, 1).double().eval()
        >>> x = torch.randn(8, 2, dtype=torch.float64)
        >>> obj = Objective(model, (x, torch.zeros(8, 1, dtype=torch.float64)),
        ...                 loss=nn.functional.mse_loss)
        >>> H = HessianOperator(obj)
        >>> torch.allclose(H.to_dense()[:2, :2], 2 * x.T @ x / 8)
        True
        >>> H.cache_bytes > 0  # the gradient graph is kept for the next products
        True
    """

    def __init__(
        self,
        objective: Objective,
        *,
        mode: str = "auto",
        block_size: int = 32,
        max_cache_bytes="auto",
    ):
        if mode not in ("auto", "forward", "reverse"):
            raise ValueError(
                f"HessianOperator: mode must be 'auto', 'forward' or 'reverse', got {mode!r}."
            )
        self.mode = mode
        super().__init__(objective, (SYMMETRIC,), block_size, max_cache_bytes)

    def _matmat_batch(self, index: int, batch: Batch, V: Tangents) -> tuple[Tangents, float]:
        if self.mode != "forward":
            return super()._matmat_batch(index, batch, V)
        try:
            return self._forward(batch, V)
        except (RuntimeError, NotImplementedError) as err:
            warnings.warn(
                f"HessianOperator: forward-mode differentiation failed ({err}); using double "
                "backward (mode='reverse') from now on.",
                stacklevel=2,
            )
            self.mode = "reverse"
            self._kept.enabled = self._can_cache()
            return super()._matmat_batch(index, batch, V)

    def _can_cache(self) -> bool:
        return self.mode != "forward" and super()._can_cache()

    def _forward(self, batch: Batch, V: Tangents) -> tuple[Tangents, float]:
        obj, box = self.objective, {}

        def loss(p: Tangents) -> torch.Tensor:
            value, box["w"] = obj.batch_loss(p, batch)
            return value

        g = grad(loss)
        out = vmap(lambda t: jvp(g, (obj.params,), (t,))[1])(V)
        return out, box["w"]

    def _graph(self, batch: Batch):
        """The batch's gradient graph ``(params, grads, weight)``."""
        params = leaf_params(self.objective)
        with torch.enable_grad():
            value, w = self.objective.batch_loss(params, batch)
            # a batch whose loss does not reach the analysed parameters (a restricted block,
            # an expert it routes around) contributes zero products
            g = (
                torch.autograd.grad(
                    value, list(params.values()), create_graph=True, allow_unused=True
                )
                if value.requires_grad
                else (None,) * len(params)
            )
        # gradients that do not depend on the parameters (unused or linear ones) have no
        # second derivative: leave them out of the second backward
        kept = {n: t for n, t in zip(params, g, strict=True) if t is not None and t.requires_grad}
        self._check_once(kept.values())
        return params, kept, w

    def _apply(self, graph, V: Tangents) -> tuple[Tangents, float]:
        """Second backward through a gradient graph: ``(k, *shape)`` Hessian products."""
        params, g, w = graph
        if not g:
            return {n: torch.zeros_like(V[n]) for n in params}, w
        return backward_columns(list(g.values()), params, [V[n] for n in g]), w
