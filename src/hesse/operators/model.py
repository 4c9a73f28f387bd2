"""Curvature of an Objective as linear operators: Hessian, generalized Gauss-Newton, Fisher."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.func import grad, jvp, vjp, vmap

from ..objective import Batch, Objective, loss_kind
from .base import PSD, SYMMETRIC, Operator, copy_with

Tangents = dict[str, torch.Tensor]


class ModelOperator(Operator):
    """An operator defined by one product per batch, summed exactly over the data.

    Subclasses implement ``_matmat_batch(index, batch, V) -> ((k, *shape) per parameter, w_b)``
    returning the batch's weighted (sum-form) product; this class splits and joins flat vectors,
    chunks wide ``V`` into ``block_size`` columns per batch (one data pass for all of them) and
    divides by the total weight.

    Args:
        objective: The loss, model and data.
        tags: Declared structure.
        block_size: Most columns pushed through the model at once (memory grows with it).
    """

    def __init__(self, objective: Objective, tags, block_size: int = 32):
        super().__init__(objective.dim, objective.dtype, objective.device, tags, objective.space)
        self.objective = objective
        self.block_size = block_size

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self._pass(V, self._matmat_batch)

    def _pass(self, V: torch.Tensor, product: Callable, items=None) -> torch.Tensor:
        """One pass over ``items`` (default: the batches) applying ``product`` per column chunk."""
        space, size = self.objective.space, self.block_size
        chunks = [space.split(V[:, i : i + size]) for i in range(0, V.shape[1], size)]

        def term(index: int, item) -> tuple[torch.Tensor, float]:
            parts, w = [], 0.0
            for T in chunks:
                out, w = product(index, item, T)
                parts.append(space.join(out))
            return torch.cat(parts, dim=1), w

        return self.objective.accumulate(term, items)

    def _matmat_batch(self, index: int, batch: Batch, V: Tangents) -> tuple[Tangents, float]:
        raise NotImplementedError

    def _restrict(self, names: list[str]) -> Operator:
        sub = self.objective.restrict(names)
        return copy_with(self, objective=sub, space=sub.space, shape=(sub.dim, sub.dim))


class HessianOperator(ModelOperator):
    r"""The Hessian of the mean loss, :math:`H = \nabla^2_\theta L(\theta)`.

    ``mode="reverse"`` (the default through ``"auto"``) differentiates the gradient again
    (double backward; Pearlmutter 1994, "Fast exact multiplication by the Hessian"). Its first
    pass over the data keeps each batch's gradient graph while their saved tensors total at
    most ``max_cache_bytes``; when every batch fits, later products only run the second
    backward through the kept graphs, about a third of the cost of a fresh product (the graphs
    are dropped when the parameters change in place). ``mode="forward"`` uses forward-over-reverse
    differentiation (``torch.func.jvp`` of ``grad``, vectorized over columns with ``vmap``).

    Args:
        objective: The loss, model and data.
        mode: ``"auto"``, ``"reverse"`` or ``"forward"``.
        block_size: Most columns pushed through the model at once.
        max_cache_bytes: Memory cap of the kept graphs (0 disables keeping them).

    Attributes:
        cache_bytes: Bytes the kept graphs hold (0 when none are kept).

    Example:
        >>> model = nn.Linear(2, 1).double()
        >>> x = torch.randn(8, 2, dtype=torch.float64)
        >>> obj = Objective(model, (x, torch.zeros(8, 1, dtype=torch.float64)),
        ...                 loss=nn.functional.mse_loss)
        >>> H = HessianOperator(obj)
        >>> torch.allclose(H.to_dense()[:2, :2], 2 * x.T @ x / 8)
        True
    """

    def __init__(
        self,
        objective: Objective,
        *,
        mode: str = "auto",
        block_size: int = 32,
        max_cache_bytes: int = 2**30,
    ):
        if mode not in ("auto", "forward", "reverse"):
            raise ValueError(
                f"HessianOperator: mode must be 'auto', 'forward' or 'reverse', got {mode!r}."
            )
        super().__init__(objective, (SYMMETRIC,), block_size)
        self.mode, self.max_cache_bytes = mode, max_cache_bytes
        self.cache_bytes, self._cache, self._versions = 0, None, None
        self._building, self._last = None, None
        self._fits = mode != "forward" and max_cache_bytes > 0

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if self._cache is not None and self._versions == self._param_versions():
            return self._pass(V, lambda i, graph, T: self._through(graph, T), self._cache)
        self._cache, self.cache_bytes = None, 0
        self._building = [] if self._fits else None
        try:
            out = self._pass(V, self._matmat_batch)
            if self._building is not None:
                self._cache, self._versions = self._building, self._param_versions()
        finally:
            self._building, self._last = None, None
        return out

    def clear_cache(self) -> None:
        """Free the kept gradient graphs (the next product rebuilds them)."""
        self.cache_bytes, self._cache, self._versions = 0, None, None

    def _matmat_batch(self, index: int, batch: Batch, V: Tangents) -> tuple[Tangents, float]:
        if self.mode != "forward":
            return self._through(self._graph(batch), V)
        try:
            return self._forward(batch, V)
        except (RuntimeError, NotImplementedError) as err:
            warnings.warn(
                f"HessianOperator: forward-mode differentiation failed ({err}); using double "
                "backward (mode='reverse') from now on.",
                stacklevel=2,
            )
            self.mode = "reverse"
            return self._through(self._graph(batch), V)

    def _forward(self, batch: Batch, V: Tangents) -> tuple[Tangents, float]:
        obj, box = self.objective, {}

        def loss(p: Tangents) -> torch.Tensor:
            value, box["w"] = obj.batch_loss(p, batch)
            return value

        g = grad(loss)
        out = vmap(lambda t: jvp(g, (obj.params,), (t,))[1])(V)
        return out, box["w"]

    def _graph(self, batch: Batch):
        """The batch's gradient graph ``(params, grads, weight)``; kept if it fits the cap."""
        if self._last is not None and self._last[0] is batch:
            return self._last[1]  # the same batch, next chunk of columns
        saved: dict = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
            return t

        obj = self.objective
        params = {n: p.detach().requires_grad_(True) for n, p in obj.params.items()}
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            value, w = obj.batch_loss(params, batch)
            g = torch.autograd.grad(
                value, list(params.values()), create_graph=True, allow_unused=True
            )
        # gradients that do not depend on the parameters (unused or linear ones) have no
        # second derivative: leave them out of the second backward
        graph = (
            params,
            {n: t for n, t in zip(params, g, strict=True) if t is not None and t.requires_grad},
            w,
        )
        self._last = (batch, graph)
        if self._building is not None:
            self.cache_bytes += sum(saved.values())
            if self.cache_bytes <= self.max_cache_bytes:
                self._building.append(graph)
            else:  # the data's graphs do not fit: recompute them on every pass
                self._building, self.cache_bytes, self._fits = None, 0, False
        return graph

    def _through(self, graph, V: Tangents) -> tuple[Tangents, float]:
        """Second backward through a kept gradient graph: ``(k, *shape)`` Hessian products.

        One backward per column: measured on CPU, vectorizing the columns with
        ``is_grads_batched`` was 1.2-1.5x slower per column than this loop.
        """
        params, g, w = graph
        ps, k = list(params.values()), next(iter(V.values())).shape[0]
        if not g:
            return {n: torch.zeros_like(V[n]) for n in params}, w
        cols = [
            torch.autograd.grad(
                list(g.values()),
                ps,
                [V[n][j] for n in g],
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
            for j in range(k)
        ]
        return {n: torch.stack([c[i] for c in cols]) for i, n in enumerate(params)}, w

    def _restrict(self, names: list[str]) -> Operator:
        block = super()._restrict(names)
        block.clear_cache()  # the kept graphs differentiate all parameters, not the block's
        return block

    def _param_versions(self) -> list[int]:
        """In-place version counters of everything the kept graphs were built from."""
        obj = self.objective
        return [t._version for t in (*obj.params.values(), *obj.frozen.values())]


class GGNOperator(ModelOperator):
    r"""The generalized Gauss-Newton matrix :math:`G = \frac1W \sum_b J_b^\top H_b J_b`.

    :math:`J_b` is the Jacobian of the model outputs on batch :math:`b` with respect to the
    parameters and :math:`H_b` the Hessian of the (weighted) loss with respect to the outputs
    (Schraudolph 2002, "Fast curvature matrix-vector products for second-order gradient
    descent"). PSD when the loss is convex in the outputs (cross-entropy, MSE), which is
    then tagged; pass ``psd=True`` to declare it for another convex loss.

    Args:
        objective: Built with ``loss=`` (the outputs must be separable from the loss).
        psd: Override the PSD tag (default: inferred from the loss).
        block_size: Most columns pushed through the model at once.
    """

    def __init__(self, objective: Objective, *, psd: bool | None = None, block_size: int = 32):
        if loss_kind(objective.loss) == "nll":
            raise ValueError(
                "GGNOperator: nll_loss is linear in its inputs (log-probabilities), so its GGN is "
                "zero; let the model output logits and use loss=cross_entropy."
            )
        psd = loss_kind(objective.loss) in ("cross_entropy", "mse") if psd is None else psd
        super().__init__(objective, (SYMMETRIC, PSD) if psd else (SYMMETRIC,), block_size)
        _needs_outputs(objective, "GGNOperator")

    def _matmat_batch(self, index: int, batch: Batch, V: Tangents) -> tuple[Tangents, float]:
        obj = self.objective
        y, w = obj.targets(batch), obj.batch_weight(batch)
        f, JV, pullback = _linearize(obj, batch, V)
        # reverse-over-reverse on the small output space: forward mode through mse_loss's
        # backward fails on its constant target (an immutable ZeroTensor tangent)
        _, hessian_out = vjp(grad(lambda out: obj.output_loss(out, y, w)), f)
        HJV = vmap(lambda u: hessian_out(u)[0])(JV)
        return vmap(pullback)(HJV), w


class FisherOperator(ModelOperator):
    r"""The Fisher information :math:`F = \frac1W \sum_n J_n^\top r_n r_n^\top J_n`.

    :math:`r_n` is the gradient of sample :math:`n`'s loss with respect to its outputs (samples
    along dim 0 of the outputs). ``kind="empirical"`` uses the data's targets (the empirical
    Fisher); ``kind="mc"`` draws ``mc_samples`` targets per sample from the model's predictive
    distribution (categorical for cross-entropy, Gaussian for MSE), so that in expectation
    :math:`F` equals the GGN (Martens 2020, "New insights and perspectives on the natural
    gradient method"; Kunstner et al. 2019, "Limitations of the empirical Fisher
    approximation"). The draws are fixed by ``seed``: the operator is the same matrix on every
    product.

    Args:
        objective: Built with ``loss=``.
        kind: ``"empirical"`` or ``"mc"``.
        mc_samples: Draws per sample for ``kind="mc"``.
        seed: Seed of the draws.
        block_size: Most columns pushed through the model at once.
    """

    def __init__(
        self,
        objective: Objective,
        kind: str = "empirical",
        *,
        mc_samples: int = 1,
        seed: int = 0,
        block_size: int = 32,
    ):
        if kind not in ("empirical", "mc"):
            raise ValueError(f"FisherOperator: kind must be 'empirical' or 'mc', got {kind!r}.")
        super().__init__(objective, (SYMMETRIC, PSD), block_size)
        _needs_outputs(objective, "FisherOperator")
        self.kind, self.mc_samples, self.seed = kind, mc_samples, seed
        self._sample = _sampler(objective.loss) if kind == "mc" else None

    def _matmat_batch(self, index: int, batch: Batch, V: Tangents) -> tuple[Tangents, float]:
        obj = self.objective
        w = obj.batch_weight(batch)
        f, JV, pullback = _linearize(obj, batch, V)
        Z = torch.zeros_like(JV)
        for y in self._targets(index, batch, f, w):
            r = grad(lambda out, y=y: obj.output_loss(out, y, w))(f.detach())
            k, n = JV.shape[:2]
            coeff = (r * JV).reshape(k, n, -1).sum(-1)  # <r_n, (J v)_n> per column and sample
            Z += coeff.reshape(*coeff.shape, *([1] * (r.dim() - 1))) * r
        return vmap(pullback)(Z / self.mc_samples if self._sample else Z), w

    def _targets(self, index: int, batch: Batch, f: torch.Tensor, w: float) -> list[torch.Tensor]:
        y = self.objective.targets(batch)
        if self._sample is None:
            return [y]
        # fixed draws per (seed, process, batch position): the same matrix on every product
        # as long as the data arrive in the same order (no shuffling loader)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        gen = torch.Generator().manual_seed(hash((self.seed, rank, index)) % 2**63)
        draws = [self._sample(f.detach(), w, gen) for _ in range(self.mc_samples)]
        if y.is_floating_point():
            return draws
        return [torch.where(y == -100, y, draw) for draw in draws]  # keep ignored labels


def _linearize(obj: Objective, batch: Batch, V: Tangents):
    """Outputs ``f``, Jacobian products ``J V`` (k, *f.shape) and the pullback ``z -> J^T z``."""

    def forward(p: Tangents) -> torch.Tensor:
        return obj.outputs(p, batch)

    f, pullback = vjp(forward, obj.params)
    JV = vmap(lambda t: jvp(forward, (obj.params,), (t,))[1])(V)
    return f, JV, lambda z: pullback(z)[0]


def _needs_outputs(objective: Objective, name: str) -> None:
    if objective.loss is None:
        raise ValueError(
            f"{name}: needs the loss as a function of the model outputs; build the Objective "
            "with loss= (e.g. torch.nn.functional.cross_entropy) instead of loss_fn= or a "
            "model that returns its own loss."
        )


def _sampler(loss: Callable | None) -> Callable:
    """Draws targets from the predictive distribution that ``loss`` is the negative log of."""
    samplers = {"cross_entropy": _sample_categorical, "mse": _sample_gaussian}
    kind = loss_kind(loss)
    if kind not in samplers:
        raise ValueError(
            "FisherOperator(kind='mc'): can sample targets for cross_entropy and mse_loss only; "
            f"got {loss!r}. Use kind='empirical' or GGNOperator for other losses."
        )
    return samplers[kind]


def _sample_categorical(f: torch.Tensor, w: float, gen: torch.Generator) -> torch.Tensor:
    logits = f.movedim(1, -1)  # classes along dim 1, as in cross_entropy
    p = torch.softmax(logits.reshape(-1, logits.shape[-1]).double().cpu(), -1)
    y = torch.multinomial(p, 1, generator=gen).reshape(logits.shape[:-1])
    return y.to(f.device)


def _sample_gaussian(f: torch.Tensor, w: float, gen: torch.Generator) -> torch.Tensor:
    # mean-reduced MSE scaled by w is (w / numel) * ||f - y||^2, the negative log-likelihood
    # of y ~ N(f, numel / (2 w)); that variance makes E[r r^T] equal the loss Hessian.
    std = (f.numel() / (2.0 * w)) ** 0.5
    noise = torch.randn(f.shape, generator=gen, dtype=torch.float64)
    return f + std * noise.to(device=f.device, dtype=f.dtype)
