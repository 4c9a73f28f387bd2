"""Curvature of an Objective as linear operators: Hessian, generalized Gauss-Newton, Fisher."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
from torch.func import grad, jvp, vjp, vmap

from ..objective import Batch, Objective
from ._autograd import (
    Linearization,
    Tangents,
    backward_columns,
    check_twice_differentiable,
    leaf_params,
    second_order,
)
from ._cache import KeptStates
from ._draws import TargetSampler
from ._memory import nbytes, saved_bytes
from .base import PSD, SYMMETRIC, Operator, copy_with


class ModelOperator(Operator):
    """An operator defined by one product per batch, summed exactly over the data.

    Subclasses implement ``_graph(batch)``, the autograd graphs a product needs on one batch
    (a gradient graph, a linearization), optionally ``_state(index, batch, graph)`` to add what
    else it needs, and ``_apply(state, V) -> ((k, *shape) per parameter, w_b)``, the batch's
    weighted (sum-form) product. This class splits and joins flat vectors, chunks wide
    ``V`` into ``block_size`` columns per batch (one data pass for all of them), divides by the
    total weight, and keeps the states of all batches between products while their saved
    tensors total at most ``max_cache_bytes`` (dropped when the parameters change in place).
    Every pass runs ``scaled_dot_product_attention`` on its math kernel, the one with a double
    backward and a forward-mode derivative.

    Args:
        objective: The loss, model and data.
        tags: Declared structure.
        block_size: Most columns pushed through the model at once (memory grows with it).
        max_cache_bytes: Memory cap of the kept states: bytes, ``0`` (keep none), or ``"auto"``
            (``AUTO_CACHE_FRACTION`` of the memory free on the device when they are built).

    Attributes:
        cache_bytes: Bytes the kept states hold (0 when none are kept).
    """

    def __init__(self, objective: Objective, tags, block_size: int = 32, max_cache_bytes="auto"):
        if max_cache_bytes != "auto" and not (
            isinstance(max_cache_bytes, int) and max_cache_bytes >= 0
        ):
            raise ValueError(
                f"{type(self).__name__}: max_cache_bytes must be a number of bytes >= 0 or "
                f"'auto', got {max_cache_bytes!r}."
            )
        super().__init__(objective.dim, objective.dtype, objective.device, tags, objective.space)
        self.objective = objective
        self.block_size, self.max_cache_bytes = block_size, max_cache_bytes
        name, enabled = type(self).__name__, self._can_cache()
        self._kept = KeptStates(
            name, max_cache_bytes, self.device, _tensors(objective), enabled=enabled
        )
        self._checked, self._last = False, None

    @property
    def cache_bytes(self) -> int:
        """Bytes the kept states hold (0 when none are kept)."""
        return self._kept.nbytes

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if self._kept.fresh():
            return self._pass(V, lambda i, state, T: self._apply(state, T), self._kept.states)
        try:
            with self._kept.first_pass():
                return self._pass(V, self._matmat_batch)
        finally:
            self._last = None

    def clear_cache(self) -> None:
        """Free the kept per-batch states (the next product rebuilds them)."""
        self._kept.clear()

    def _pass(self, V: torch.Tensor, product: Callable, items=None) -> torch.Tensor:
        """One pass over ``items`` (default: the batches) applying ``product`` per column chunk."""
        space, size = self.objective.space, self.block_size
        chunks = [space.split(V[:, i : i + size]) for i in range(0, V.shape[1], size)]

        def term(index: int, item) -> tuple[torch.Tensor, float]:
            parts, w = [], 0.0
            with second_order(type(self).__name__):
                for T in chunks:
                    out, w = product(index, item, T)
                    parts.append(space.join(out))
            return torch.cat(parts, dim=1), w

        return self.objective.accumulate(term, items)

    def _matmat_batch(self, index: int, batch: Batch, V: Tangents) -> tuple[Tangents, float]:
        return self._apply(self._state_of(index, batch), V)

    # ------------------------------------------------------------------ what subclasses define
    def _graph(self, batch: Batch):
        """The autograd graphs of one batch (measured while caching)."""
        raise NotImplementedError

    def _state(self, index: int, batch: Batch, graph):
        """Everything a product on batch ``index`` needs, built from its graphs."""
        return graph

    def _apply(self, state, V: Tangents) -> tuple[Tangents, float]:
        """The batch's weighted product ``((k, *shape) per parameter, w_b)``."""
        raise NotImplementedError

    def _held_bytes(self, state) -> int:
        """Bytes a state holds outside its autograd graphs."""
        return 0

    def _can_cache(self) -> bool:
        return self.max_cache_bytes != 0

    # ------------------------------------------------------------------ per-batch states
    def _state_of(self, index: int, batch: Batch):
        """The batch's state: reused for its next chunk of columns, measured while caching."""
        if self._last is not None and self._last[0] is batch:
            return self._last[1]
        self._last = None  # free the previous batch's state before building this one
        build = self._kept.build
        if build is None:
            state = self._state(index, batch, self._graph(batch))
        else:
            state, size = self._measured_state(index, batch, build.resident)
            build.add(state, size)
        self._last = (batch, state)
        return state

    def _measured_state(self, index: int, batch: Batch, resident: set[int]):
        """``(state, bytes)``: the state and the bytes it holds (what its graphs save, and more)."""
        graph, saved = saved_bytes(lambda: self._graph(batch), resident)
        state = self._state(index, batch, graph)  # torch.func refuses saved-tensor hooks
        return state, saved + self._held_bytes(state)

    def _measure_state(self, batch: Batch) -> int:
        """Bytes one batch's kept state takes (for the memory plan); nothing is kept."""
        with second_order(type(self).__name__):
            return self._measured_state(0, batch, self._kept.resident())[1]

    def _check_once(self, grads: Iterable[torch.Tensor]) -> None:
        """Check the first batch's backward graph for once-differentiable Functions."""
        if not self._checked:
            check_twice_differentiable(type(self).__name__, grads)
            self._checked = True

    def _restrict(self, names: list[str]) -> Operator:
        sub = self.objective.restrict(names)
        # the kept states differentiate all parameters, not the block's; and a block's graphs
        # may fit where the whole did not
        kept = self._kept.emptied(_tensors(sub), enabled=self._can_cache())
        return copy_with(self, objective=sub, space=sub.space, shape=(sub.dim, sub.dim), _kept=kept)


def _tensors(objective: Objective) -> tuple[torch.Tensor, ...]:
    """The parameters and buffers that kept states are built from."""
    return (*objective.params.values(), *objective.frozen.values())


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
            g = torch.autograd.grad(
                value, list(params.values()), create_graph=True, allow_unused=True
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


class _Linearized(ModelOperator):
    r"""A curvature :math:`J^\top M J` of the outputs, through each batch's kept linearization."""

    def __init__(self, objective: Objective, tags, block_size: int, max_cache_bytes):
        if objective.loss is None:
            raise ValueError(
                f"{type(self).__name__}: needs the loss as a function of the model outputs; "
                "build the Objective with loss= (e.g. torch.nn.functional.cross_entropy) "
                "instead of loss_fn= or a model that returns its own loss."
            )
        super().__init__(objective, tags, block_size, max_cache_bytes)

    def _graph(self, batch: Batch) -> Linearization:
        lin = Linearization(self.objective, batch)
        self._check_once(lin.JTu.values())
        return lin


class GGNOperator(_Linearized):
    r"""The generalized Gauss-Newton matrix :math:`G = \frac1W \sum_b J_b^\top H_b J_b`.

    :math:`J_b` is the Jacobian of the model outputs on batch :math:`b` with respect to the
    parameters and :math:`H_b` the Hessian of the (weighted) loss with respect to the outputs
    (Schraudolph 2002, "Fast curvature matrix-vector products for second-order gradient
    descent"). PSD when the loss is convex in the outputs (cross-entropy, MSE), which is
    then tagged; pass ``psd=True`` to declare it for another convex loss. Each batch's
    linearization (the graphs of :math:`f` and :math:`J^\top u`) is kept between products when
    it fits ``max_cache_bytes``, as the Hessian keeps its graphs.

    Args:
        objective: With a loss of the model outputs (``loss=``, or one inferred for a Hugging
            Face model).
        psd: Override the PSD tag (default: inferred from the loss).
        block_size: Most columns pushed through the model at once.
        max_cache_bytes: Memory cap of the kept linearizations (bytes, 0, or ``"auto"``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hesse import Objective
        >>> x = torch.randn(8, 2, dtype=torch.float64)
        >>> model = nn.Linear(2, 1).double().eval()
        >>> obj = Objective(model, (x, torch.zeros(8, 1, dtype=torch.float64)),
        ...                 loss=nn.functional.mse_loss)
        >>> G = GGNOperator(obj)  # a linear model: the GGN is the Hessian
        >>> torch.allclose(G.to_dense(), HessianOperator(obj).to_dense())
        True
    """

    def __init__(
        self,
        objective: Objective,
        *,
        psd: bool | None = None,
        block_size: int = 32,
        max_cache_bytes="auto",
    ):
        kind = _loss_kind(objective)
        if kind == "nll":
            raise ValueError(
                "GGNOperator: nll_loss is linear in its inputs (log-probabilities), so its GGN is "
                "zero; let the model output logits and use loss=cross_entropy."
            )
        psd = kind in ("cross_entropy", "mse") if psd is None else psd
        tags = (SYMMETRIC, PSD) if psd else (SYMMETRIC,)
        super().__init__(objective, tags, block_size, max_cache_bytes)

    def _state(self, index: int, batch: Batch, lin: Linearization):
        obj = self.objective
        y, w = obj.targets(batch), obj.batch_weight(batch)
        # reverse-over-reverse on the small output space: forward mode through mse_loss's
        # backward fails on its constant target (an immutable ZeroTensor tangent)
        _, hessian_out = vjp(grad(lambda out: obj.output_loss(out, y, w)), lin.f.detach())
        return lin, hessian_out, w

    def _apply(self, state, V: Tangents) -> tuple[Tangents, float]:
        lin, hessian_out, w = state
        HJV = vmap(lambda u: hessian_out(u)[0])(lin.jvp(V))
        return lin.vjp(HJV), w

    def _held_bytes(self, state) -> int:
        return 2 * nbytes(state[0].f)  # u, and what the output Hessian saves (a softmax)


class FisherOperator(_Linearized):
    r"""The Fisher information :math:`F = \frac1W \sum_n J_n^\top r_n r_n^\top J_n`.

    :math:`r_n` is the gradient of the batch's ``output_loss`` with respect to row :math:`n` of
    ``Objective.outputs``: one row per sample, or one per token for a loss inferred for a
    Hugging Face token model (masked or causal LM, token classifier), so each kept token is a
    term; rows of ignored labels have :math:`r_n = 0`. ``kind="empirical"`` uses the data's
    targets (the empirical Fisher); ``kind="mc"`` draws ``mc_samples`` targets per sample from
    the model's predictive distribution (categorical for cross-entropy, Gaussian for MSE), so
    that in expectation :math:`F` equals the GGN (Martens 2020, "New insights and perspectives
    on the natural gradient method"; Kunstner et al. 2019, "Limitations of the empirical Fisher
    approximation"). Each draw is a fixed function of ``(seed, the sample's global position,
    draw number)`` (``Objective.sample_positions``): the operator is the same matrix on every
    product, whichever batch or process a sample lands in; a shuffling loader is refused.

    Args:
        objective: With a loss of the model outputs (``loss=``, or one inferred for a Hugging
            Face model).
        kind: ``"empirical"`` or ``"mc"``.
        mc_samples: Draws per sample for ``kind="mc"``.
        seed: Seed of the draws.
        block_size: Most columns pushed through the model at once.
        max_cache_bytes: Memory cap of the kept linearizations (bytes, 0, or ``"auto"``).

    Raises:
        ValueError: ``kind="mc"`` with a loss it cannot sample from: other than cross-entropy
            or MSE, or a class-weighted or label-smoothed cross-entropy (neither is the
            negative log-likelihood of a distribution).
    """

    def __init__(
        self,
        objective: Objective,
        kind: str = "empirical",
        *,
        mc_samples: int = 1,
        seed: int = 0,
        block_size: int = 32,
        max_cache_bytes="auto",
    ):
        if kind not in ("empirical", "mc"):
            raise ValueError(f"FisherOperator: kind must be 'empirical' or 'mc', got {kind!r}.")
        if not (isinstance(mc_samples, int) and mc_samples >= 1):
            raise ValueError(f"FisherOperator: mc_samples must be >= 1, got {mc_samples!r}.")
        super().__init__(objective, (SYMMETRIC, PSD), block_size, max_cache_bytes)
        self.kind, self.mc_samples, self.seed = kind, mc_samples, seed
        self._draw = None
        if kind == "mc":
            self._draw = TargetSampler(
                objective, _loss_kind(objective), seed=seed, count=mc_samples
            )

    def _state(self, index: int, batch: Batch, lin: Linearization):
        obj, f = self.objective, lin.f.detach()
        y, w = obj.targets(batch), obj.batch_weight(batch)
        ys = [y] if self._draw is None else self._draw(index, y, f, w)
        rs = [grad(lambda out, y=y: obj.output_loss(out, y, w))(f) for y in ys]
        return lin, rs, w

    def _apply(self, state, V: Tangents) -> tuple[Tangents, float]:
        lin, rs, w = state
        JV = lin.jvp(V)
        Z = torch.zeros_like(JV)
        k, n = JV.shape[:2]
        for r in rs:
            coeff = (r * JV).reshape(k, n, -1).sum(-1)  # <r_n, (J v)_n> per column and sample
            Z += coeff.reshape(*coeff.shape, *([1] * (r.dim() - 1))) * r
        return lin.vjp(Z / len(rs)), w

    def _held_bytes(self, state) -> int:
        return (1 + len(state[1])) * nbytes(state[0].f)


def _loss_kind(objective: Objective) -> str | None:
    return objective.loss_spec.kind if objective.loss_spec is not None else None


CURVATURES = ("hessian", "ggn", "fisher")
"""The curvature matrices the applications take by name (``curvature=``)."""


def curvature_operator(obj, curvature: str, who: str = "curvature_operator") -> ModelOperator:
    """The operator of ``obj`` named ``curvature``: ``"hessian"``, ``"ggn"`` or ``"fisher"``.

    ``"fisher"`` is the empirical Fisher (:class:`FisherOperator`'s default).

    Raises:
        ValueError: an unknown name (the message starts with ``who``).
    """
    kinds = {"hessian": HessianOperator, "ggn": GGNOperator, "fisher": FisherOperator}
    if curvature not in kinds:
        raise ValueError(f"{who}: curvature must be one of {CURVATURES}, got {curvature!r}.")
    return kinds[curvature](obj)
