"""Spectral criteria of a minimum that loss-landscape studies relate to generalization (LLA)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..linalg import DensityResult, density, eigs
from ..operators import curvature_operator
from ..problem.objective import Objective

DEFINITIONS = {
    "ratio": "λmax / λk: how far the top eigenvalue stands above the k-th (outlier dominance)",
    "negative_share": (
        "Σ|λ| over λ < 0 divided by Σ|λ| over all λ, from the SLQ spectral density: the share "
        "of the curvature mass that is negative (0 at a minimum, larger on saddle-like ground)"
    ),
    "trace_ratio": (
        "Tr(H) / λmax: the effective number of directions as sharp as the sharpest "
        "(1 when one eigenvalue holds all the trace)"
    ),
}
"""The definition of each criterion, written into reports next to its value."""


@dataclass(frozen=True)
class SpectralCriteria:
    """LLA-style spectral criteria of the curvature at the weights.

    Attributes:
        k: The index of the eigenvalue in ``ratio``.
        eigenvalues: The ``k`` largest eigenvalues, descending.
        lambda_max: The largest eigenvalue.
        ratio: ``lambda_max / lambda_k``.
        negative_share: Share of the absolute spectral mass on negative eigenvalues.
        trace: The trace (stochastic Lanczos quadrature) and its standard error.
        trace_stderr: Standard error of ``trace``.
        trace_ratio: ``trace / lambda_max``.
        definitions: ``DEFINITIONS``.
    """

    k: int
    eigenvalues: tuple[float, ...]
    lambda_max: float
    ratio: float
    negative_share: float
    trace: float
    trace_stderr: float
    trace_ratio: float
    definitions: dict

    def as_dict(self) -> dict[str, Any]:
        """JSON-able fields (for a results document)."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def spectral_criteria(
    obj: Objective,
    *,
    k: int = 5,
    curvature: str = "hessian",
    steps: int = 40,
    probes: int = 4,
    seed: int = 0,
) -> SpectralCriteria:
    r"""λmax/λk, the negative share of the spectrum and Tr/λmax, with their definitions.

    .. math::
        r_k = \frac{\lambda_1}{\lambda_k}, \qquad
        s_- = \frac{\sum_{\lambda_i < 0} |\lambda_i|}{\sum_i |\lambda_i|}, \qquad
        t = \frac{\mathrm{Tr}(H)}{\lambda_1}

    :math:`\lambda_1 \ge \dots \ge \lambda_k` come from :func:`hesse.eigs`; :math:`s_-` and the
    trace from :func:`hesse.density` (stochastic Lanczos quadrature: each probe's Ritz nodes
    :math:`\theta_j` with weights :math:`\tau_j` give :math:`s_- = \sum \tau_j |\theta_j|
    [\theta_j < 0] / \sum \tau_j |\theta_j|`, pooled over probes). These are the criteria the
    LLA study ("Investigating generalization by means of loss landscapes and Hessian
    analysis") tracks against generalization, next to the landscapes along Hessian axes.

    Args:
        obj: The objective at the weights.
        k: Which eigenvalue divides :math:`\lambda_1` (``k >= 2``).
        curvature: ``"hessian"``, ``"ggn"`` or ``"fisher"``.
        steps: Lanczos steps per SLQ probe.
        probes: SLQ probes.
        seed: Seed of the Lanczos start and the probes.

    Returns:
        SpectralCriteria.

    Raises:
        ValueError: ``k < 2`` or an unknown curvature.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> x = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)).sqrt()
        >>> model = nn.Linear(3, 1, bias=False).double()
        >>> obj = Objective(model, [(x, torch.zeros(3, 1, dtype=torch.float64))],
        ...                 nn.functional.mse_loss)  # H = 2 diag(3, 2, 1) / 3
        >>> c = spectral_criteria(obj, k=3, steps=3, probes=2)
        >>> round(c.ratio, 6), round(c.trace_ratio, 6), c.negative_share
        (3.0, 2.0, 0.0)
    """
    if k < 2:
        raise ValueError(f"spectral_criteria: k must be >= 2 (λmax / λk), got {k}.")
    op = curvature_operator(obj, curvature)
    top = eigs(op, min(k, obj.dim), seed=seed)
    return criteria_from(
        top.values, density(op, steps=min(steps, obj.dim), probes=probes, seed=seed)
    )


def criteria_from(eigenvalues: Any, dens: DensityResult) -> SpectralCriteria:
    """The criteria of :func:`spectral_criteria` from results already computed (no product).

    Args:
        eigenvalues: The ``k >= 2`` largest eigenvalues, descending (``EigResult.values``).
        dens: The SLQ density of the same operator.

    Returns:
        SpectralCriteria with ``k = len(eigenvalues)``.
    """
    vals = tuple(float(v) for v in eigenvalues)
    mass = dens.weights * dens.nodes.abs()
    share = float(mass[dens.nodes < 0].sum() / mass.sum()) if float(mass.sum()) > 0 else 0.0
    tr = dens.trace_estimate
    return SpectralCriteria(
        len(vals), vals, vals[0], vals[0] / vals[-1], share, tr.value, tr.stderr,
        tr.value / vals[0], dict(DEFINITIONS),
    )  # fmt: skip
