"""Spectral density by stochastic Lanczos quadrature, all probes in one block."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ._util import Counted, generator, mean_ci, rademacher
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
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    dim: int
    n_matvecs: int

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
        """The trace implied by the quadrature: ``d`` times the mean first moment of the probes."""
        value, se, (lo, hi) = mean_ci(self.dim * (self.weights * self.nodes).sum(1))
        return TraceResult(value, se, (lo, hi), self.n_matvecs, "slq", True, self.nodes.shape[0])


def density(
    A: Any, steps: int = 80, probes: int = 10, *, seed: int = 0, progress: bool = False
) -> DensityResult:
    r"""Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    Each Rademacher probe :math:`v/\|v\|` starts ``steps`` Lanczos iterations with full
    reorthogonalization; the eigenvalues :math:`\theta_j` of the tridiagonal matrix are the
    nodes and the squared first components of its eigenvectors the weights of a Gauss
    quadrature for :math:`v^\top g(A) v` (Golub & Meurant 2010; Ubaru, Chen & Saad 2017,
    "Fast estimation of tr(f(A)) via stochastic Lanczos quadrature"; Ghorbani, Krishnan & Xiao
    2019 for neural networks). All probes advance together: each step is one ``(d, probes)``
    product, a single pass over the data.

    Args:
        A: Symmetric operator or dense tensor ``(d, d)``.
        steps: Lanczos steps per probe (capped at ``d``).
        probes: Number of random probes.
        seed: Seed of the probes.
        progress: Show a progress bar.

    Returns:
        DensityResult.
    """
    if steps < 1 or probes < 1:
        raise ValueError(f"density: steps and probes must be >= 1, got {steps} and {probes}.")
    d = A.shape[0]
    steps = min(steps, d)
    op = Counted(A, progress, steps * probes, "density")
    Q = torch.zeros(steps + 1, d, probes, dtype=op.dtype, device=op.device)
    Q[0] = rademacher(generator(seed), d, probes, op) / d**0.5
    alpha = torch.zeros(probes, steps, dtype=torch.float64)
    beta = torch.zeros(probes, steps, dtype=torch.float64)
    length = torch.full((probes,), steps)
    for j in range(steps):
        W = op(Q[j])
        scale = torch.linalg.vector_norm(W.double(), dim=0).cpu()
        for _ in range(2):  # full reorthogonalization, per probe
            c = torch.einsum("jdp,dp->jp", Q[: j + 1], W)
            W = W - torch.einsum("jdp,jp->dp", Q[: j + 1], c)
            alpha[:, j] += c[j].double().cpu()
        b = torch.linalg.vector_norm(W.double(), dim=0).cpu()
        closed = (b <= 1e3 * torch.finfo(op.dtype).eps * scale) & (length == steps)
        length[closed] = j + 1
        beta[:, j] = torch.where(length > j + 1, b, torch.zeros_like(b))
        alive = (length > j + 1).to(W.device)
        Q[j + 1] = torch.where(alive, W / torch.where(alive, b.to(W), 1.0), 0.0)
    op.close()
    nodes = torch.zeros(probes, steps, dtype=torch.float64)
    weights = torch.zeros(probes, steps, dtype=torch.float64)
    for i in range(probes):
        n = int(length[i])
        T = (
            torch.diag(alpha[i, :n])
            + torch.diag(beta[i, : n - 1], 1)
            + torch.diag(beta[i, : n - 1], -1)
        )
        theta, S = torch.linalg.eigh(T)
        nodes[i, :n], weights[i, :n] = theta, S[0] ** 2
    return DensityResult(nodes, weights, d, op.n)
