r"""Kronecker-factored curvature: KFAC (Martens & Grosse 2015) and EKFAC (George et al. 2018).

The GGN (or Fisher) of an :class:`~hesse.Objective` is approximated by one diagonal block per
module, each a Kronecker product of an activation and an output-gradient covariance, so that
products, the trace, the spectrum and the damped inverse cost a few small matrix products
and eigendecompositions, with no pass over the data after the factors are built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch

from ..problem.objective import Objective
from ..problem.params import ParamSpace
from ._kfac_blocks import DenseBlock, EigenBlock, KronBlock, Layout, eigenbasis
from ._kfac_capture import KINDS, Vectors
from ._kfac_dense import dense_blocks
from ._kfac_factors import eigen_scalings, factor_terms
from ._kfac_layers import Group, find_groups, group_bytes, layout_of, matrix_shape
from ._kfac_shard import full_shapes, on_full, unsharded
from .base import PSD, SYMMETRIC, Operator, copy_with

APPROX = ("expand", "reduce")
MAX_DENSE = 4096
"""Default largest block (in parameters) formed as a dense matrix."""


class _Kronecker(Operator):
    """A block-diagonal operator of Kronecker-factored and exact dense blocks (the shared base)."""

    def __init__(
        self,
        objective: Objective,
        kind: str = "exact",
        approx: str = "expand",
        *,
        seed: int = 0,
        mc_samples: int = 1,
        max_dense: int = MAX_DENSE,
    ):
        who = type(self).__name__
        _check_settings(who, kind, approx, mc_samples, max_dense)
        super().__init__(
            objective.dim, objective.dtype, objective.device, (SYMMETRIC, PSD), objective.space
        )
        self.kind, self.approx, self.seed, self.mc_samples = kind, approx, seed, mc_samples
        self.max_dense = max_dense
        # under FSDP: factors of the full layers from this process's data, summed over the
        # processes; products gather their local input (hesse.operators._kfac_shard)
        self._shard, full = objective.shard, unsharded(objective)
        self._full_space = full.space
        groups = find_groups(full, max_dense, who)
        layouts = {gi: _layout(g, full) for gi, g in enumerate(groups) if not g.dense}
        vectors = Vectors(full, kind, seed, mc_samples, who)
        factored = self._factored(full, groups, layouts, vectors)
        exact = dense_blocks(full, groups, kind, mc_samples=mc_samples, seed=seed)
        self._blocks = [factored[gi] if gi in factored else exact[gi] for gi in range(len(groups))]

    def _factored(self, objective, groups, layouts, vectors) -> dict:
        raise NotImplementedError

    @property
    def factors(self) -> dict[str, KronBlock | EigenBlock | DenseBlock]:
        r"""The diagonal blocks by their modules' names (``"a+b"`` for a tied weight).

        A :class:`KronBlock` holds ``terms``, ``(L, R)`` pairs acting on the parameters seen as
        one matrix ``M`` (``layout``: the weight as ``(outputs, inputs)`` rows, the bias as a
        last column) as :math:`M \mapsto \sum_t L_t M R_t`, a 1-d factor being a diagonal;
        an :class:`EigenBlock` its eigenbasis ``QL``, ``QR`` and scalings ``S``
        ``(rows, cols)``; a :class:`DenseBlock` its exact ``matrix``.
        """
        return {b.label: b for b in self._blocks}

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return on_full(
            self._shard, self._full_space, V, lambda parts: _apply(self._blocks, parts, "apply")
        )

    def _restrict(self, names: list[str]) -> Operator:
        shard = None if self._shard is None else self._shard.subset(names)
        sub = cast(ParamSpace, self.space).subspace(names) if shard is None else shard.space
        return copy_with(
            self,
            _blocks=_restricted(self._blocks, names),
            space=sub,
            shape=(sub.dim,) * 2,
            _shard=shard,
            _full_space=self._full_space.subspace(names),
        )

    def trace(self) -> float:
        r"""The trace, from the factors: :math:`\sum_t \mathrm{tr}(L_t)\,\mathrm{tr}(R_t)`."""
        return sum(b.trace() for b in self._blocks)

    def eigenvalues(self) -> torch.Tensor:
        """All ``d`` eigenvalues, float64, descending (outer products of the factors' spectra).

        Raises:
            ValueError: a tied weight's block (a sum of Kronecker products) larger than
                ``max_dense``, or a non-finite factor.
        """
        return torch.cat([b.eigenvalues() for b in self._blocks]).sort(descending=True).values

    def logdet(self, damping: float = 0.0) -> float:
        r""":math:`\log\det(K + \text{damping}\, I)` from the eigenvalues (-inf if singular)."""
        return float(torch.log(self.eigenvalues() + float(damping)).sum())

    def inverse(self, damping: float = 0.0, **options) -> Operator:
        r"""``(K + damping I)^{-1}`` exactly, block by block, from the factors' eigenbases.

        For one Kronecker term :math:`L \otimes R = (Q_L \otimes Q_R)\,
        \mathrm{diag}(\lambda_i \mu_j)\,(Q_L \otimes Q_R)^\top`, so the damped inverse
        product is :math:`Q_L \big[(Q_L^\top M Q_R) \oslash (\lambda\mu^\top +
        \text{damping})\big] Q_R^\top`; dense and tied blocks use their eigendecompositions.

        Raises:
            ValueError: negative damping, a singular block at ``damping=0``, solver ``options``.
        """
        if options:
            raise ValueError(
                f"{type(self).__name__}.inverse: the inverse is exact (from the factors); solver "
                f"options {sorted(options)} do not apply. Call .inverse(damping)."
            )
        if not float(damping) >= 0:
            raise ValueError(f"{type(self).__name__}.inverse: damping must be >= 0, got {damping}.")
        return _KroneckerInverse(self, float(damping))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(d={self.shape[0]}, kind={self.kind!r}, "
            f"approx={self.approx!r}, blocks={len(self._blocks)}, dtype={self.dtype})"
        )


class KFACOperator(_Kronecker):
    r"""Kronecker-factored GGN or Fisher: one block :math:`G \otimes A` per layer (KFAC).

    For a layer :math:`z = W a` (bias: a column of ones in :math:`a`) of the objective
    :math:`L = \frac1W \sum_b w_b \ell_b` (:class:`~hesse.Objective`), the GGN's block is
    :math:`\frac1W \sum_{n,c} (g_{nc} g_{nc}^\top) \otimes (a_n a_n^\top)` for the output
    gradients :math:`g_{nc}` of vectors :math:`s_c` with :math:`\sum_c s_c s_c^\top` the
    loss's output Hessian; KFAC replaces the expectation of the product by the product

    .. math::
        K = G \otimes A, \qquad G = \frac1W \sum_{n,c} g_{nc} g_{nc}^\top, \qquad
        A = \frac{1}{N} \sum_n a_n a_n^\top ,

    which is exact when :math:`g_{nc}` does not depend on the sample (a deep linear network
    with squared loss; one sample). Positions that share the weight (tokens, image patches)
    count as rows of :math:`A` and :math:`G` (``approx="expand"``), or are averaged (inputs)
    and summed (gradients) per sample first (``"reduce"``), Eschenhagen et al. 2023,
    "Kronecker-Factored Approximate Curvature for Modern Neural Network Architectures".
    ``kind`` picks the vectors:

    - ``"exact"`` factorises the output Hessian of every row of ``Objective.outputs`` exactly
      (KFLR, type-2): one backward per class and per row of a sample (row ``k`` of all samples
      at once), so the factors are those of the GGN itself, also for token losses whose rows
      interact through attention. Costly for language models (rows x vocabulary backward
      passes per batch): use ``"mc"`` there.
    - ``"mc"`` draws ``mc_samples`` targets per row from the model (the MC Fisher's draws,
      keyed by sample position) and backpropagates a sample's rows together: the terms between
      rows vanish in expectation, so the factors are unbiased for the GGN's.
    - ``"empirical"`` backpropagates the gradient at the true targets, a sample's rows together:
      the empirical Fisher of per-sample gradients (kronfluence's; ``FisherOperator``'s
      ``"empirical"`` when each sample is one row).

    Sums run over all data and processes with the objective's sample weights (uneven batches,
    ignored labels, the causal-LM shift, class weights), so the matrix does not depend on the
    batching. A position that no vector reaches (its output gradient is exactly 0: padding, an
    ignored label, the last token of a causal LM) adds no row to :math:`A` either, so padding
    changes nothing.

    Coverage: ``nn.Linear`` and Hugging Face ``Conv1D`` (weight stored ``(in, out)``),
    ``nn.Conv2d`` (zero padding, one group; patches unfolded), ``nn.Embedding`` (activation
    factor: the diagonal of token counts, always "expand"). A weight used by several of these
    (an embedding tied to the LM head) gets the sum of one term per use: the terms between uses
    are dropped, the approximation made for tied weights. The parameters of any other module
    (LayerNorm, RMSNorm, batch-norm) get their exact block (GGN, or the Fisher of ``kind``)
    when it has at most ``max_dense`` entries, and are refused by name otherwise; a parameter
    also used outside its module's forward is refused by name. Nothing is dropped: the
    dimension and the parameter order are the objective's.

    Args:
        objective: With a loss of the model outputs (``loss=``, or one inferred for a Hugging
            Face model).
        kind: ``"exact"``, ``"mc"`` or ``"empirical"``.
        approx: ``"expand"`` or ``"reduce"``.
        seed: Seed of the draws for ``kind="mc"``.
        mc_samples: Draws per sample for ``kind="mc"``.
        max_dense: Largest exact block of an unfactored module, and largest tied block whose
            spectrum and inverse are formed densely.

    Raises:
        ValueError: a bad setting; a loss ``kind`` cannot handle (``"exact"`` and ``"mc"``:
            cross-entropy and MSE; ``"mc"`` not with class weights or label smoothing); an
            unfactored module larger than ``max_dense``; a parameter used outside its module;
            non-finite factors (naming the batch).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hesse import Objective, reference
        >>> _ = torch.manual_seed(0)
        >>> x, t = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
        >>> obj = Objective(nn.Linear(3, 2).double().eval(), (x, t), loss=nn.functional.mse_loss)
        >>> K = KFACOperator(obj)  # one linear layer, squared loss: KFAC is exact
        >>> torch.allclose(K.to_dense(), reference.dense_ggn(obj), rtol=1e-10, atol=0)
        True
        >>> v = torch.ones(8, dtype=torch.float64)
        >>> torch.allclose(K @ (K.inverse(damping=0.1) @ v) + 0.1 * (K.inverse(0.1) @ v), v)
        True
    """

    def _factored(self, objective, groups, layouts, vectors) -> dict:
        who = type(self).__name__
        terms = factor_terms(objective, groups, layouts, vectors, self.approx, who)
        return {
            gi: KronBlock(layouts[gi], terms[gi], groups[gi].label, self.max_dense) for gi in terms
        }

    @classmethod
    def factor_bytes(cls, objective: Objective, *, max_dense: int = MAX_DENSE) -> int:
        r"""Bytes the factors will take, in the objective's dtype, before any data pass.

        Per layer :math:`\text{out}^2 + (\text{in} + 1)^2` entries (an embedding: its vocabulary
        once, for the diagonal, plus its width squared), per tied use one such pair, and
        :math:`d_g^2` for each exact dense block. :meth:`inverse`, :meth:`eigenvalues` and
        :meth:`logdet` add the factors' eigendecompositions (as many entries again).

        Raises:
            ValueError: as the constructor, for an unfactored module above ``max_dense``.
        """
        objective = full_shapes(objective)  # under FSDP: the full layers' factors
        groups = find_groups(objective, max_dense, cls.__name__)
        return sum(group_bytes(g, objective) for g in groups)


class EKFACOperator(_Kronecker):
    r"""Eigenvalue-corrected KFAC: KFAC's eigenbasis with the exact diagonal in it (EKFAC).

    George et al. 2018, "Fast Approximate Natural Gradient Descent in a Kronecker-factored
    Eigenbasis". Keeps KFAC's eigenbasis :math:`Q = Q_G \otimes Q_A` per layer and replaces
    its eigenvalues by the exact diagonal of the curvature in that basis, from per-sample
    gradients :math:`\nabla_{nc}` (a second data pass):

    .. math::
        E = Q\,\mathrm{diag}(S)\,Q^\top, \qquad
        S = \frac1W \sum_{n,c} \big(Q_G^\top \nabla_{nc} Q_A\big)^{\odot 2},

    so that :math:`\mathrm{diag}(Q^\top E Q) = \mathrm{diag}(Q^\top \mathcal{G} Q)` for the
    exact block :math:`\mathcal{G}` (the GGN's for ``kind="exact"``, token losses included):
    the closest matrix to :math:`\mathcal{G}` with that eigenbasis, in Frobenius norm. A tied
    weight's basis is that of its uses' factors summed, each scaled to unit trace; its
    scalings use the weight's whole per-sample gradient. The coverage, ``kind``, ``approx``
    (which KFAC factors give the basis) and the other arguments are :class:`KFACOperator`'s;
    per-sample gradients need dim 0 of each factored module's input to hold the samples.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hesse import Objective
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(32, 3, dtype=torch.float64), torch.randint(0, 4, (32,))
        >>> model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double().eval()
        >>> E = EKFACOperator(Objective(model, (x, y), loss=nn.functional.cross_entropy))
        >>> bool(abs(E.trace() - float(E.eigenvalues().sum())) < 1e-10)
        True
    """

    def _factored(self, objective, groups, layouts, vectors) -> dict:
        who = type(self).__name__
        terms = factor_terms(objective, groups, layouts, vectors, self.approx, who)
        bases = {gi: eigenbasis(t, groups[gi].label) for gi, t in terms.items()}
        del terms  # the factors are not needed once their eigenbases are known
        S = eigen_scalings(objective, groups, layouts, bases, vectors, who)
        return {gi: EigenBlock(layouts[gi], *bases[gi], S[gi], groups[gi].label) for gi in bases}

    @classmethod
    def factor_bytes(cls, objective: Objective, *, max_dense: int = MAX_DENSE) -> int:
        """Bytes the operator will hold: eigenbases (objective's dtype) and float64 scalings.

        Building it also holds KFAC's factors for a while (:meth:`KFACOperator.factor_bytes`).
        """
        item = torch.empty((), dtype=objective.dtype).element_size()
        total, objective = 0, full_shapes(objective)
        for g in find_groups(objective, max_dense, cls.__name__):
            if g.dense:
                total += group_bytes(g, objective)
                continue
            rows, cols = matrix_shape(g, objective)
            diagonal = all(u.kind == "embedding" for u in g.uses)
            total += item * ((0 if diagonal else rows * rows) + cols * cols) + 8 * rows * cols
        return total


class _KroneckerInverse(Operator):
    """``(K + damping I)^{-1}`` of a Kronecker-factored operator, block by block."""

    def __init__(self, op: _Kronecker, damping: float):
        super().__init__(op.shape[0], op.dtype, op.device, (SYMMETRIC, PSD), op.space)
        self.op, self.damping = op, damping

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        blocks, damping = self.op._blocks, self.damping
        return on_full(
            self.op._shard, self.op._full_space, V, lambda p: _apply(blocks, p, "solve", damping)
        )


def _apply(blocks, parts: dict, method: str, *args) -> dict:
    out = {}
    for block in blocks:
        out.update(getattr(block, method)({n: parts[n] for n in block.names}, *args))
    return out


def _restricted(blocks, names: Sequence[str]) -> list:
    keep = set(names)
    out = []
    for block in blocks:
        mine = [n for n in block.names if n in keep]
        if mine:
            out.append(block.restrict(mine))
    return out


def _layout(group: Group, objective: Objective) -> Layout:
    weight, axis, bias = layout_of(group, objective)
    shapes = [objective.params[n].shape for n in group.names]
    return Layout(group.names, shapes, weight, axis, bias)


def _check_settings(who: str, kind, approx, mc_samples, max_dense) -> None:
    if kind not in KINDS:
        raise ValueError(f"{who}: kind must be one of {KINDS}, got {kind!r}.")
    if approx not in APPROX:
        raise ValueError(f"{who}: approx must be one of {APPROX}, got {approx!r}.")
    if not (isinstance(mc_samples, int) and mc_samples >= 1):
        raise ValueError(f"{who}: mc_samples must be an integer >= 1, got {mc_samples!r}.")
    if not (isinstance(max_dense, int) and max_dense >= 0):
        raise ValueError(f"{who}: max_dense must be an integer >= 0, got {max_dense!r}.")
