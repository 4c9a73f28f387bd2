"""Spectral density by stochastic Lanczos quadrature, probes in groups of one product each."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..operators._memory import probe_group
from ._lanczos import Lanczos, basis_dtype, step
from ._util import (
    Counted,
    as_operator,
    dimension,
    generator,
    mean_ci,
    rademacher,
    require_symmetric,
)
from .trace import TraceResult


@dataclass(frozen=True)
class DensityResult:
    r"""Gauss quadrature nodes and weights of the spectral density :math:`\phi(t)`.

    .. math::
        \phi(t) \approx \frac{1}{n_v}\sum_{l=1}^{n_v}\sum_{j=1}^{m} \tau_j^{(l)}
            \, g_\sigma\!\left(t - \theta_j^{(l)}\right)

    Attributes:
        nodes: ``(probes, steps)`` float64 Ritz values :math:`\theta_j^{(l)}` of each probe.
        weights: ``(probes, steps)`` float64 weights :math:`\tau_j^{(l)}`; each row sums to 1
            (rows of probes whose Krylov space closed early are padded with zero weights).
        dim: The dimension ``d`` of the operator.
        n_matvecs: Matrix-vector products used.
        product_error: The largest error per unit input of the products (finite differences:
            ``HessianOperator(mode="fd")``), 0 for exact products; ``trace_estimate`` widens
            its interval by ``dim`` times it.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    dim: int
    n_matvecs: int
    product_error: float = 0.0

    @property
    def support(self) -> tuple[float, float]:
        """Smallest and largest node carrying weight."""
        used = self.nodes[self.weights > 0]
        return float(used.min()), float(used.max())

    def __call__(self, grid: Any, sigma: float | None = None) -> torch.Tensor:
        """Gaussian-smoothed density on ``grid`` ``(n,)``; ``sigma`` defaults to 1% of the range."""
        t = torch.as_tensor(grid, dtype=torch.float64).reshape(-1, 1)
        if sigma is None:
            lo, hi = self.support
            sigma = 0.01 * (hi - lo) if hi > lo else 1.0
        nodes, weights = self.nodes.reshape(1, -1), self.weights.reshape(1, -1)
        kernel = torch.exp(-0.5 * ((t - nodes) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        return (kernel * weights).sum(1) / self.nodes.shape[0]

    def moment(self, power: int) -> tuple[float, float]:
        r"""Estimate of :math:`\mathrm{tr}(A^p)/d` and its standard error over probes."""
        per_probe = (self.weights * self.nodes**power).sum(1)
        value, se, _ = mean_ci(per_probe)
        return value, se

    @property
    def trace_estimate(self) -> TraceResult:
        r"""The trace implied by the quadrature: ``d`` times the mean first moment of the probes.

        Each probe's moment is :math:`q^\top \tilde A q` for a unit ``q``: approximate products
        make it up to ``product_error`` off, so the interval is widened by ``d`` times that.
        """
        value, se, (lo, hi) = mean_ci(self.dim * (self.weights * self.nodes).sum(1))
        pad = self.dim * self.product_error
        n = self.nodes.shape[0]
        return TraceResult(value, se, (lo - pad, hi + pad), self.n_matvecs, "slq", True, n)


def density(
    A: Any,
    steps: int = 80,
    probes: int = 10,
    *,
    seed: int = 0,
    progress: bool | None = None,
    group: int | None = None,
) -> DensityResult:
    r"""Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    Each Rademacher probe :math:`v/\|v\|` starts ``steps`` Lanczos iterations (the core that
    :func:`~hesse.eigs` uses: float64 basis, full reorthogonalization, products in the
    operator's dtype); the eigenvalues :math:`\theta_j` of the tridiagonal matrix are the
    nodes and the squared first components of its eigenvectors the weights of a Gauss
    quadrature for :math:`v^\top g(A) v` (Golub & Meurant 2010; Ubaru, Chen & Saad 2017,
    "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature"; Ghorbani, Krishnan & Xiao
    2019 for neural networks). A probe whose Krylov space becomes invariant (its residual at
    the round-off level of the products) stops early: its quadrature is then exact.

    The probes of one group advance together: each step is one ``(d, group)`` product, a
    single pass over the data. The float64 bases of a group take ``(steps + 1) * group * d * 8``
    bytes, so memory follows ``group``, not ``probes``. Chen, Trogdon & Ubaru (2021, "Analysis
    of stochastic Lanczos quadrature for spectrum approximation") bound the Wasserstein-1
    distance between the averaged quadrature measure and the spectrum by
    :math:`t\,(\lambda_{max}-\lambda_{min})` with high probability once ``steps`` exceeds
    :math:`12/t` and ``probes * d`` exceeds about :math:`4 t^{-2}\ln(2d/\eta)`.

    Args:
        A: Symmetric operator ``(d, d)`` (any input :func:`~hesse.eigs` takes).
        steps: Lanczos steps per probe (capped at ``d``).
        probes: Number of random probes.
        seed: Seed of the probes; probe ``i`` is the same whatever ``group``.
        progress: Progress bar of products: True, False, or None (shown on a terminal when the
            run lasts more than a second).
        group: Probes per product; default as many as fit in 1 GiB of basis (at least 1).

    Returns:
        DensityResult.

    Raises:
        ValueError: a non-symmetric matrix or an operator not tagged symmetric; an operator
            whose products turn out not symmetric (measured at every step, beyond
            :math:`\sqrt{\varepsilon}\,\|A\|`); ``steps``, ``probes`` or ``group`` below 1.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
        >>> r = density(A, steps=4, probes=2)
        >>> r.nodes[0]
        tensor([1., 2., 3., 4.], dtype=torch.float64)
        >>> r.trace_estimate.value
        10.0
    """
    A = as_operator(A)
    require_symmetric(A, "density")
    if steps < 1 or probes < 1 or (group is not None and group < 1):
        raise ValueError(
            f"density: steps, probes and group must be >= 1, got {steps}, {probes}, {group}."
        )
    d = dimension(A)
    steps = min(steps, d)
    group = probe_group(d, steps, probes, group)
    op, gen = Counted(A, progress, steps * probes, "density"), generator(seed)
    nodes = torch.zeros(probes, steps, dtype=torch.float64)
    weights = torch.zeros(probes, steps, dtype=torch.float64)
    try:
        for first in range(0, probes, group):
            count = min(group, probes - first)
            nodes[first : first + count], weights[first : first + count] = _quadratures(
                op, gen, steps, count
            )
    finally:
        op.close()
    return DensityResult(nodes, weights, d, op.n, op.error)


def _quadratures(op: Counted, gen: torch.Generator, steps: int, count: int):
    """Nodes and weights ``(count, steps)`` of ``count`` new probes advanced together."""
    start = [rademacher(gen, op.d, 1, op, basis_dtype(op.device)) for _ in range(count)]
    runs = [Lanczos(op, steps, z, gen) for z in start]
    for _ in range(steps):
        step([lz for lz in runs if lz.n < steps], op)
    nodes = torch.zeros(count, steps, dtype=torch.float64)
    weights = torch.zeros(count, steps, dtype=torch.float64)
    for i, lz in enumerate(runs):
        theta, S = torch.linalg.eigh(lz.H)
        nodes[i, : lz.n], weights[i, : lz.n] = theta, S[0] ** 2
    return nodes, weights
