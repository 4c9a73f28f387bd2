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
from .model import ModelOperator, copy_into


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

    ``mode="fd"`` differentiates nothing twice, for models that cannot be (fused kernels,
    compiled graphs): central differences of gradients along each unit direction
    :math:`u = v/\|v\|`, at three steps :math:`t, t/2, t/4`, combined by Richardson
    extrapolation,

    .. math::
        D(t) = \|v\| \frac{\nabla L(\theta + t u) - \nabla L(\theta - t u)}{2t},\quad
        R(t) = \frac{4 D(t/2) - D(t)}{3},\quad Hv \approx R(t/2),

    with :math:`t = \varepsilon^{1/3} \max(1, \|\theta\|_\infty)` (the step that balances the
    truncation error :math:`O(t^2)` against the round-off :math:`O(\varepsilon/t)` of the
    dtype). Each product measures its own error as :math:`2\|R(t/2) - R(t)\|` per column,
    relative to :math:`\|v\|`: the difference holds the truncation error of :math:`R(t)`
    (16 times that of :math:`R(t/2)`) and the round-off of both (twice covers that of
    :math:`R(t/2)`, which the smallest step makes the largest); the largest so far is
    :attr:`product_error`, which ``eigs``, ``density`` and ``trace`` add to their bounds and
    intervals, so that a result from these products is never more trusted than they are.
    Six gradients per column and batch; nothing is cached. Under FSDP the local shards are
    perturbed (the step and the column norms are the same on every process) and each gradient
    is a local shard (see :class:`~hesse.Objective`); ``mode="forward"`` is refused there.

    Args:
        objective: The loss, model and data.
        mode: ``"auto"``, ``"reverse"``, ``"forward"`` or ``"fd"``.
        block_size: Most columns pushed through the model at once.
        max_cache_bytes: Memory cap of the kept graphs: bytes, 0 (keep none), or ``"auto"``
            (half of the memory free when they are built).

    Attributes:
        cache_bytes: Bytes the kept graphs hold (0 when none are kept).
        product_error: With ``mode="fd"``, the largest measured error of a product per unit
            norm of its input, :math:`\max_j \|E v_j\| / \|v_j\|`; 0 for exact products.

    Raises:
        ValueError: an unknown ``mode``, or ``mode="forward"`` on a sharded (FSDP) objective.

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
        if mode not in ("auto", "forward", "reverse", "fd"):
            raise ValueError(
                f"HessianOperator: mode must be 'auto', 'forward', 'reverse' or 'fd', got {mode!r}."
            )
        if mode == "forward" and objective.shard is not None:
            raise ValueError(
                "HessianOperator: mode='forward' (torch.func) cannot run through the gathers of "
                "a sharded (FSDP) model; use mode='reverse' (the default), which is exact there."
            )
        self.mode, self.product_error = mode, 0.0
        super().__init__(objective, (SYMMETRIC,), block_size, max_cache_bytes)

    def _matmat_batch(self, index: int, batch: Batch, V: Tangents, out: Tangents) -> float:
        if self.mode != "forward":
            return super()._matmat_batch(index, batch, V, out)
        try:
            return copy_into(self._forward(batch, V), out)
        except (RuntimeError, NotImplementedError) as err:
            warnings.warn(
                f"HessianOperator: forward-mode differentiation failed ({err}); using double "
                "backward (mode='reverse') from now on.",
                stacklevel=2,
            )
            self.mode = "reverse"
            self._kept.enabled = self._can_cache()
            return super()._matmat_batch(index, batch, V, out)

    _SHARES_LEAVES = True  # under FSDP the batches of a pass share one gathered copy

    def _can_cache(self) -> bool:
        return self.mode not in ("forward", "fd") and super()._can_cache()

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if self.mode != "fd":
            return super()._matmat(V)
        shard = self.objective.shard
        largest = max(
            (float(p.abs().max()) for p in self.objective.params.values() if p.numel()), default=0.0
        )
        scale = max(1.0, largest if shard is None else shard.max(largest))
        t = torch.finfo(self.dtype).eps ** (1 / 3) * scale
        D1, D2, D4 = (
            self._pass(V, lambda i, b, T, out, h=h: copy_into(self._difference(b, T, h), out))
            for h in (t, t / 2, t / 4)
        )
        R1, R2 = (4 * D2 - D1) / 3, (4 * D4 - D2) / 3
        norms = [(X.double() ** 2).sum(0) for X in (R2 - R1, V)]
        gap, size = norms if shard is None else [shard.sum(x) for x in norms]
        ratio = 2 * gap.sqrt() / size.sqrt().clamp_min(1e-300)
        self.product_error = max(self.product_error, float(ratio.max()))
        return R2

    def _difference(self, batch: Batch, V: Tangents, t: float) -> tuple[Tangents, float]:
        """Central differences :math:`D(t)` of the batch's gradient along each column."""
        obj, names, cols, w = self.objective, list(self.objective.params), [], 0.0
        norms = torch.stack([V[n].flatten(1).double().square().sum(1) for n in names]).sum(0)
        norms = norms if obj.shard is None else obj.shard.sum(norms)  # the same on all
        for j, norm in enumerate(norms.sqrt().tolist()):
            if norm == 0.0:
                cols.append([torch.zeros_like(V[n][j]) for n in names])
                continue
            grads = []
            for sign in (1.0, -1.0):
                at = {n: p + (sign * t / norm) * V[n][j] for n, p in obj.params.items()}
                g, w = _gradient(obj, at, batch)
                grads.append(g)
            cols.append([(a - b) * (norm / (2 * t)) for a, b in zip(*grads, strict=True)])
        return {n: torch.stack([c[i] for c in cols]) for i, n in enumerate(names)}, w

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
        params = self._leaves if self._leaves is not None else leaf_params(self.objective)
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
        out = {n: torch.zeros_like(V[n]) for n in graph[0]}
        return out, self._apply_into(graph, V, out)

    def _apply_into(self, graph, V: Tangents, out: Tangents) -> float:
        """The second backward, each column written into ``out`` as it comes out."""
        params, g, w = graph
        if g:
            backward_columns(list(g.values()), params, [V[n] for n in g], out=out)
        return w


def _gradient(obj: Objective, params: Tangents, batch: Batch) -> tuple[tuple, float]:
    """The gradient of the batch's weighted loss at ``params``, and the batch weight."""
    params = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    with torch.enable_grad():
        value, w = obj.batch_loss(params, batch)
        if not value.requires_grad:
            return tuple(torch.zeros_like(p) for p in params.values()), w
        g = torch.autograd.grad(
            value, list(params.values()), allow_unused=True, materialize_grads=True
        )
    return g, w
