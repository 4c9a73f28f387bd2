r"""The damped curvature that pruning decisions read: dense, Woodbury (M-FAC), diagonal or KFAC.

Damping is relative: :math:`\lambda = \rho \cdot \mathrm{mean}(\mathrm{diag}\, C)`, so one
``damping=`` value means the same on every model. A dense matrix is factorized by Cholesky;
when :math:`C + \lambda I` is not positive definite (the exact Hessian of a trained network
rarely is) :math:`\rho` grows tenfold until it is, and the value used is reported.

Weights the loss never reaches (their row of :math:`C` is zero: a zero gradient on every
sample drawn, for the Fisher) are marked: every saliency puts them first, since removing them
changes nothing the curvature sees. Damping alone would rank them by :math:`\lambda w^2`,
above weights the loss does use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch

from ..linalg import diagonal
from ..operators import WoodburyFisher, curvature_operator
from ..problem.objective import Objective
from ._gradients import collect_gradients
from ._kronecker import KRONECKER, KroneckerCurvature, kronecker_blocks

CURVATURES = ("fisher", "ggn", "hessian", *KRONECKER)
MAX_DENSE = 8192
"""Largest number of pruned weights whose curvature is formed as a dense matrix."""
_RAISES = 12  # tenfold increases of the damping tried before giving up


@dataclass(frozen=True)
class Damped:
    r"""A damped curvature :math:`C + \lambda I` over the prunable weights.

    Attributes:
        kind: ``"fisher"``, ``"ggn"``, ``"hessian"``, ``"kfac"`` or ``"ekfac"``.
        damping: :math:`\lambda`, absolute; with Fisher blocks, each damped relative to its
            own mean diagonal, the mean of their :math:`\lambda` weighted by block size.
        relative: :math:`\rho = \lambda / \mathrm{mean}(\mathrm{diag}\, C)` as used (larger
            than asked when a Cholesky factorization needed more).
        diag: :math:`\mathrm{diag}(C) + \lambda`, ``(d,)``.
        reached: ``(d,)`` bool, False where the row of :math:`C` is zero (a weight the loss
            never reaches, or one already pruned).
        cholesky: Lower Cholesky factor of the dense :math:`C + \lambda I`, or None.
        woodbury: ``(slice, WoodburyFisher)`` for each diagonal block of the Fisher (one block
            for a global Woodbury), or ``()``.
        kronecker: The KFAC or EKFAC blocks in their eigenbases, or None.
    """

    kind: str
    damping: float
    relative: float
    diag: torch.Tensor
    reached: torch.Tensor
    cholesky: torch.Tensor | None = None
    woodbury: tuple[tuple[slice, WoodburyFisher], ...] = ()
    kronecker: KroneckerCurvature | None = None

    def inverse_diag(self) -> torch.Tensor:
        r""":math:`\mathrm{diag}((C + \lambda I)^{-1})`, ``(d,)``."""
        if self.kronecker is not None:
            return self.kronecker.inverse_diag()
        if self.woodbury:
            return torch.cat([F.inverse_diag() for _, F in self.woodbury])
        return torch.cholesky_inverse(self._cholesky()).diagonal()

    def obs_update(self, w: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, float]:
        r"""The OBS change of ``w`` that zeroes the weights ``Q``, and its predicted loss increase.

        Dense: the exact joint update
        :math:`\delta = -H^{-1}_{:Q} ([H^{-1}]_{QQ})^{-1} w_Q`, predicted
        :math:`\frac12 w_Q^\top ([H^{-1}]_{QQ})^{-1} w_Q` (Hassibi & Stork 1993, "Second order
        derivatives for network pruning: Optimal Brain Surgeon"). Woodbury: the same
        update in the form :math:`\delta_Q = -w_Q`,
        :math:`\delta_R = H_{RR}^{-1} H_{RQ} w_Q` (:math:`R` the other weights), where
        :math:`H_{RR} = \lambda I + G_R^\top G_R / m` is again a Woodbury matrix and
        :math:`H_{RQ} = G_R^\top G_Q / m`: exact, :math:`O(m d)` memory, no
        :math:`|Q| \times |Q|` matrix. Predicted: :math:`\frac12 \delta^\top H \delta`.
        KFAC/EKFAC: the dense form per block, solved by CG on products with the Kronecker
        inverse, holding the weights pruned before at zero too (their curvature is not
        decoupled; see :meth:`KroneckerCurvature.obs_update`).
        """
        if len(Q) == 0:
            return torch.zeros_like(w), 0.0
        if self.kronecker is not None:
            return self.kronecker.obs_update(w, Q)
        if self.woodbury:
            return _blockwise_update(self.woodbury, w, Q)
        Hinv = torch.cholesky_inverse(self._cholesky())
        coeff = torch.linalg.solve(Hinv[Q][:, Q], w[Q])
        return -(Hinv[:, Q] @ coeff), float(0.5 * (w[Q] @ coeff))

    def _cholesky(self) -> torch.Tensor:
        # dense when not Woodbury: only OBD reads a diagonal curvature, and it inverts nothing
        return cast(torch.Tensor, self.cholesky)


def _blockwise_update(blocks, w: torch.Tensor, Q: torch.Tensor):
    """The joint OBS update under a block-diagonal curvature: block by block, exactly."""
    delta, predicted = torch.zeros_like(w), 0.0
    chosen = torch.zeros_like(w, dtype=torch.bool)
    chosen[Q] = True
    for part, F in blocks:
        q = chosen[part].nonzero().flatten()
        if len(q):
            d, p = _woodbury_update(F, w[part], q)
            delta[part], predicted = d, predicted + p
    return delta, predicted


def _woodbury_update(F: WoodburyFisher, w: torch.Tensor, Q: torch.Tensor):
    """The joint OBS update of :meth:`Damped.obs_update` with a Woodbury curvature."""
    rest = torch.ones_like(w, dtype=torch.bool)
    rest[Q] = False
    G = F.grads
    G_R = G * rest.to(G)
    rhs = G_R.T @ (G[:, Q] @ w[Q]) / F.m
    delta = WoodburyFisher(G_R, F.damping).inverse() @ rhs
    delta[Q] = -w[Q]
    return delta, float(0.5 * (delta @ (F @ delta)))


def damped(
    obj: Objective,
    kind: str,
    relative: float,
    *,
    form: str,
    m: int | str | None = "auto",
    batch_size: int = 1,
    budget: int | None = None,
    seed: int = 0,
    alive: torch.Tensor | None = None,
    fisher_block: int | None = 128,
) -> Damped:
    r"""Build the damped curvature of ``obj`` in the ``form`` a method needs.

    Args:
        obj: The objective over the prunable weights.
        kind: ``"fisher"`` (empirical, from ``m`` gradients of ``batch_size`` samples),
            ``"ggn"``, ``"hessian"``, or ``"kfac"``/``"ekfac"`` (of the GGN, any size: see
            :mod:`hesse.prune._kronecker`; the weights pruned before are not decoupled).
        relative: :math:`\rho > 0`.
        form: ``"diagonal"`` (OBD), ``"dense"`` (OBS) or ``"woodbury"`` (M-FAC; Fisher only).
        m: Gradients of the empirical Fisher (``"auto"``: 256, or every chunk when the data
            holds fewer; None: every chunk).
        batch_size: Samples per gradient.
        budget: Probes of the Hutchinson diagonal of the GGN or Hessian (None: exact, from the
            dense matrix).
        seed: Seed of the gradients drawn and of the probes.
        alive: ``(d,)`` bool, the weights not yet pruned; the curvature of the others is
            decoupled (:math:`\lambda` on their diagonal, zero elsewhere).
        fisher_block: Woodbury form: weights per diagonal block of the Fisher (consecutive in
            the flat layout, as M-FAC's blocks), or None for one global block.

    Raises:
        ValueError: an unknown ``kind`` or ``form``, ``relative <= 0``, Woodbury with another
            curvature than the Fisher, or a dense matrix over ``MAX_DENSE`` weights.
        RuntimeError: no damping up to :math:`10^{12}\rho` made the matrix positive definite.
    """
    if kind not in CURVATURES:
        raise ValueError(f"prune: curvature must be one of {CURVATURES}, got {kind!r}.")
    if not relative > 0:
        raise ValueError(
            f"prune: damping must be > 0 (relative to the mean curvature diagonal), got "
            f"{relative}; 1e-2 is a safe start."
        )
    alive = torch.ones(obj.dim, dtype=torch.bool) if alive is None else alive.cpu()
    if kind in KRONECKER:
        return _kronecker(obj, kind, relative, form, alive)
    if form == "woodbury":
        return _woodbury(obj, kind, relative, m, batch_size, seed, alive, fisher_block)
    if form == "diagonal":
        diag = _diagonal(obj, kind, m, batch_size, budget, seed) * alive.to(obj.dtype)
        lam = relative * _scale(diag[alive])
        return Damped(kind, lam, relative, diag + lam, diag != 0)
    if form != "dense":
        raise ValueError(f"prune: unknown curvature form {form!r}.")
    C = _dense(obj, kind, m, batch_size, seed)
    keep = alive.to(C.dtype)
    C = C * keep[:, None] * keep[None, :]
    return _factorized(kind, C, relative, _scale(C.diagonal()[alive]))


def _kronecker(obj, kind: str, relative: float, form: str, alive: torch.Tensor) -> Damped:
    r"""KFAC or EKFAC plus :math:`\lambda I`, relative to the mean diagonal of the alive weights.

    The weights pruned before keep their curvature: every OBS update holds them at zero.
    """
    if form == "woodbury":
        raise ValueError(
            f"prune: method 'mfac' inverts the empirical Fisher of m gradients (Woodbury), not "
            f"curvature={kind!r}; use method='obs' or 'obd' with the Kronecker factors."
        )
    blocks = kronecker_blocks(obj, kind)
    C_diag = torch.empty(obj.dim, dtype=obj.dtype, device=obj.device)
    for b in blocks:
        C_diag[b.index] = b.diag
    lam = relative * _scale(C_diag[alive])
    H = KroneckerCurvature(blocks, lam, ~alive)
    return Damped(kind, lam, relative, C_diag + lam, C_diag != 0, kronecker=H)


def _woodbury(obj, kind, relative, m, batch_size, seed, alive, fisher_block) -> Damped:
    if kind != "fisher":
        raise ValueError(
            f"prune: method 'mfac' uses the empirical Fisher of m gradients (Woodbury), not "
            f"curvature={kind!r}; use method='obs' for a dense {kind} on small models."
        )
    if fisher_block is not None and fisher_block < 1:
        raise ValueError(f"prune: fisher_block must be >= 1 or None, got {fisher_block}.")
    G = collect_gradients(obj, m, batch_size=batch_size, seed=seed)
    G = G * alive.to(G)
    d = G.shape[1]
    size = d if fisher_block is None else fisher_block
    C_diag = (G**2).mean(0)
    overall = _scale(C_diag[alive])
    blocks = tuple(
        _block(G, C_diag, alive, slice(i, min(i + size, d)), relative, relative * overall)
        for i in range(0, d, size)
    )
    diag = torch.cat([F.diag() for _, F in blocks])
    lam = sum(F.damping * F.shape[0] for _, F in blocks) / d
    return Damped(kind, lam, relative, diag, (G != 0).any(0), woodbury=blocks)


def _block(G, C_diag, alive, part: slice, relative: float, fallback: float):
    """One diagonal block of the Fisher, damped relative to its own mean diagonal.

    A block the loss never reaches (its diagonal is zero) gets ``fallback``, the damping
    relative to the mean diagonal of the whole Fisher, not an absolute 0.01.
    """
    own = C_diag[part][alive[part]]
    mean = float(own.mean()) if own.numel() else 0.0
    lam = relative * mean if mean > 0 else fallback
    return part, WoodburyFisher(G[:, part], lam)


def _diagonal(obj, kind, m, batch_size, budget, seed) -> torch.Tensor:
    if kind == "fisher":
        G = collect_gradients(obj, m, batch_size=batch_size, seed=seed)
        return (G**2).mean(0)
    if budget is None:
        return _dense(obj, kind, m, batch_size, seed).diagonal()
    return diagonal(curvature_operator(obj, kind, "prune"), budget, seed=seed).value


def _dense(obj, kind, m, batch_size, seed) -> torch.Tensor:
    if obj.dim > MAX_DENSE:
        raise ValueError(
            f"prune: a dense {kind} over {obj.dim} weights is too large (at most {MAX_DENSE}); "
            "use method='mfac' (Woodbury) or 'layer_obs', select fewer parameters with params=, "
            "or pass budget= for a Hutchinson diagonal (OBD)."
        )
    if kind == "fisher":
        G = collect_gradients(obj, m, batch_size=batch_size, seed=seed)
        return G.T @ G / G.shape[0]
    C = curvature_operator(obj, kind, "prune").to_dense()
    return (C + C.T) / 2


def _factorized(kind: str, C: torch.Tensor, relative: float, scale: float) -> Damped:
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    reached = (C != 0).any(0)
    rho = relative
    for _ in range(_RAISES):
        L, info = torch.linalg.cholesky_ex(C + rho * scale * eye)
        if info == 0:
            lam = rho * scale
            return Damped(kind, lam, rho, C.diagonal() + lam, reached, cholesky=L)
        rho *= 10
    raise RuntimeError(
        f"prune: the {kind} plus damping up to {rho / 10:.3g} x its mean diagonal is not "
        "positive definite; check the curvature for non-finite entries."
    )


def _scale(diag: torch.Tensor) -> float:
    """Mean of a curvature diagonal, the unit of relative damping.

    1 when it is 0: then the loss reaches no weight, every saliency is 0, and the damping
    only keeps the factorizations finite.
    """
    mean = float(diag.abs().mean()) if diag.numel() else 0.0
    return mean if mean > 0 else 1.0
