r"""Per-weight saliencies: magnitude, OBD, OBS and M-FAC (WoodFisher).

With :math:`H` the damped curvature (:math:`C + \lambda I`, :math:`C` the empirical Fisher,
GGN or Hessian), the predicted loss increase of setting weight :math:`q` to zero is

.. math::
    s^{\mathrm{OBD}}_q = \tfrac12 H_{qq} w_q^2, \qquad
    s^{\mathrm{OBS}}_q = \frac{w_q^2}{2 [H^{-1}]_{qq}}

(LeCun, Denker & Solla 1990, "Optimal Brain Damage"; Hassibi & Stork 1993, "Optimal Brain
Surgeon"); OBS lets the other weights move, OBD does not. ``"mfac"`` is OBS with the empirical
Fisher of ``m`` gradients inverted by Woodbury (Singh & Alistarh 2020, "WoodFisher"; Frantar
et al. 2021, "M-FAC"). With ``curvature="kfac"`` or ``"ekfac"``, :math:`C` is the
Kronecker-factored GGN (``KFACOperator`` / ``EKFACOperator``) and both saliencies are exact
for :math:`C + \lambda I` from its factors, at any size (LLM Surgeon, van der Ouderaa et al.
2023, "The LLM Surgeon").

A weight the loss never reaches (its row of the curvature is zero: for the Fisher, a zero
gradient on every sample drawn) scores 0 under every curvature method, so it is pruned first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..problem.objective import Objective
from ._curvature import Damped, damped

METHODS = ("magnitude", "obd", "obs", "mfac")
FORMS = {"obd": "diagonal", "obs": "dense", "mfac": "woodbury"}


@dataclass(frozen=True)
class Saliency:
    r"""Saliencies of the weights, named like the parameters.

    Attributes:
        scores: ``{name: tensor of the parameter's shape}``; the smallest are pruned first.
            Weights the loss never reaches (a zero row of the curvature) score 0.
        method: ``"magnitude"``, ``"obd"``, ``"obs"`` or ``"mfac"``.
        curvature: ``"fisher"``, ``"ggn"``, ``"hessian"``, ``"kfac"`` or ``"ekfac"``; None for
            magnitude.
        damping: The absolute damping :math:`\lambda` used (0 for magnitude; for M-FAC blocks,
            each damped relative to its own mean diagonal, their size-weighted mean).
        relative_damping: :math:`\lambda` over the mean curvature diagonal, as used (larger
            than asked when the Cholesky factorization needed more).
    """

    scores: dict[str, torch.Tensor]
    method: str
    curvature: str | None
    damping: float
    relative_damping: float

    @property
    def flat(self) -> torch.Tensor:
        """All scores as one flat ``(d,)`` vector, in the order of :attr:`scores`."""
        return torch.cat([s.reshape(-1) for s in self.scores.values()])


def saliency(
    obj: Objective,
    method: str = "mfac",
    *,
    curvature: str = "fisher",
    damping: float = 1e-2,
    m: int | str | None = "auto",
    batch_size: int = 1,
    budget: int | None = None,
    fisher_block: int | None = 128,
    seed: int = 0,
) -> Saliency:
    r"""Score every analysed weight of ``obj`` by the loss increase its removal predicts.

    Args:
        obj: The objective; restrict it (``obj.restrict("*.weight")``) to score fewer weights.
        method: ``"magnitude"`` (:math:`|w_q|`), ``"obd"``, ``"obs"`` (dense curvature, at most
            ``MAX_DENSE`` weights; any size with ``"kfac"``/``"ekfac"``) or ``"mfac"``
            (Woodbury, any size).
        curvature: ``"fisher"`` (empirical, from ``m`` gradients: positive semi-definite, the
            default), ``"ggn"`` or ``"hessian"`` (indefinite away from a minimum: OBS then
            needs a large damping, found automatically), or ``"kfac"`` / ``"ekfac"`` (the
            ``KFACOperator`` / ``EKFACOperator`` of the GGN, factors of kind ``"exact"``).
        damping: :math:`\rho`, the damping relative to the mean curvature diagonal.
        m: Gradients of the empirical Fisher (``"auto"``: 256, or every chunk when the data
            holds fewer; None: every chunk).
        batch_size: Samples per gradient.
        budget: OBD with the GGN or Hessian: Hutchinson probes of the diagonal (None: exact,
            from the dense matrix).
        fisher_block: M-FAC: weights per diagonal block of the Fisher, each inverted by
            Woodbury (consecutive weights of the flat layout; M-FAC and WoodFisher prune with
            such blocks), or None for one global Woodbury over all weights.
        seed: Seed of the gradients drawn and of the probes.

    Returns:
        The :class:`Saliency`.

    Raises:
        ValueError: an unknown method or curvature, damping <= 0, ``m`` larger than the data.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> obj = Objective(torch.nn.Linear(4, 3), [(x, y)], loss=torch.nn.functional.cross_entropy)
        >>> s = saliency(obj, "mfac", m=16)
        >>> s.scores["weight"].shape, s.damping > 0
        (torch.Size([3, 4]), True)
    """
    w = obj.space.join(obj.params)
    if method == "magnitude":
        return _named(obj, w.abs(), method, None, 0.0, 0.0)
    H = curvature_for(obj, method, curvature, damping, m, batch_size, budget, seed, fisher_block)
    return scored(obj, w, H, method)


def curvature_for(
    obj, method, curvature, damping, m, batch_size, budget, seed, fisher_block=128, alive=None
) -> Damped:
    """The damped curvature that ``method`` reads (see :func:`saliency`)."""
    if method not in METHODS:
        raise ValueError(f"prune: method must be one of {METHODS}, got {method!r}.")
    return damped(
        obj,
        curvature,
        damping,
        form=FORMS[method],
        m=m,
        batch_size=batch_size,
        budget=budget,
        seed=seed,
        alive=alive,
        fisher_block=fisher_block,
    )


def scored(obj: Objective, w: torch.Tensor, H: Damped, method: str) -> Saliency:
    """OBD or OBS saliencies of the flat weights ``w`` under the damped curvature ``H``."""
    if method == "obd":
        flat = 0.5 * H.diag * w**2
    else:
        flat = w**2 / (2 * H.inverse_diag())
    # a weight the loss never reaches costs nothing to remove; damping alone would score it
    flat = torch.where(H.reached, flat, 0.0)
    return _named(obj, flat, method, H.kind, H.damping, H.relative)


def _named(obj, flat, method, curvature, lam, rho) -> Saliency:
    return Saliency(obj.space.split(flat.detach()), method, curvature, lam, rho)
