"""The generalized Gauss-Newton and Fisher matrices of an Objective as operators (PSD)."""

from __future__ import annotations

import torch
from torch.func import grad, vjp, vmap

from ..losses import OutputLoss
from ..problem.objective import Batch, Objective
from ._autograd import (
    Linearization,
    Tangents,
)
from ._draws import TargetSampler
from ._memory import nbytes
from .base import PSD, SYMMETRIC
from .model import ModelOperator


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
    descent"). PSD when the loss is convex in the outputs, which is then tagged: each
    recognised loss declares it (``objective.loss_spec.curvature.convex``: cross-entropy, MSE,
    comp-sum with tau <= 1; not GCE, MAE, Z-loss or AnyLoss); pass ``psd=True`` to declare it for
    another convex loss. A :mod:`hesse.losses` loss gives :math:`H_b` in closed form
    (``hessian_product``) instead of autograd; a loss linear in the outputs (``nll_loss``)
    is refused, its GGN being zero. Each batch's
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
        >>> from hesse import HessianOperator, Objective
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
        curvature, closed_form = _declared_curvature(objective)
        convex = curvature is not None and curvature.convex
        psd = convex if psd is None else psd
        tags = (SYMMETRIC, PSD) if psd else (SYMMETRIC,)
        super().__init__(objective, tags, block_size, max_cache_bytes)
        self._closed_form = curvature if closed_form else None

    def _state(self, index: int, batch: Batch, lin: Linearization):
        obj = self.objective
        y, w = obj.targets(batch), obj.batch_weight(batch)
        f, closed = lin.f.detach(), self._closed_form
        if closed is not None:  # the loss's own closed form (hesse.losses)
            return lin, lambda u: (w * closed.hessian_product(f, y, u),), w

        def loss(out: torch.Tensor) -> torch.Tensor:
            return obj.output_loss(out, y, w)

        # reverse-over-reverse on the small output space: forward mode through mse_loss's
        # backward fails on its constant target (an immutable ZeroTensor tangent)
        hessian_out = vjp(grad(loss), f)[1]
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


def _declared_curvature(objective: Objective) -> tuple[OutputLoss | None, bool]:
    """The curvature the objective's loss declares, and whether its products are closed-form.

    Raises:
        ValueError: a loss linear in the outputs (``nll_loss``): its GGN is zero.
    """
    spec = objective.loss_spec
    if spec is None or spec.curvature is None:
        return None, False
    if spec.curvature.linear:
        hint = (
            "let the model output logits and use loss=cross_entropy"
            if spec.kind == "nll"
            else "analyse the model with a loss that is not linear in the outputs"
        )
        raise ValueError(
            f"GGNOperator: {spec.kind} is linear in its inputs, so its output Hessian and GGN "
            f"are zero; {hint}."
        )
    return spec.curvature, spec.closed_form


def _loss_kind(objective: Objective) -> str | None:
    return objective.loss_spec.kind if objective.loss_spec is not None else None
