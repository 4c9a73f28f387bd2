"""The top eigenvalue of mini-batch Hessians against the batch size, and the LR it implies."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..linalg import eigs
from ..operators import curvature_operator
from ..problem._positions import rows_of, samples_in
from ..problem.objective import Objective
from ._common import one_batch


@dataclass(frozen=True)
class BatchSpectrum:
    r"""λmax of mini-batch curvature for each batch size, over random batches.

    Attributes:
        batch_sizes: The sizes, ``"full"`` resolved to the number of samples.
        values: Per size, the λmax of each drawn batch.
        mean: Per size, the mean λmax.
        std: Per size, the standard deviation over batches (0 for one draw).
        stderr: Per size, the standard error of the mean.
        full: λmax of the full-batch curvature.
        n_samples: Samples in the data.
        max_lr: Per size, ``2 / mean``: the largest stable step of GD on such batches.
        lr_exponent: Fitted :math:`\alpha` in ``max_lr ∝ B**alpha`` over the sizes below
            ``n_samples`` (least squares in log-log; nan with fewer than two sizes).
        n_matvecs: Products used in all.
    """

    batch_sizes: tuple[int, ...]
    values: tuple[tuple[float, ...], ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    stderr: tuple[float, ...]
    full: float
    n_samples: int
    max_lr: tuple[float, ...]
    lr_exponent: float
    n_matvecs: int

    def rows(self) -> list[list[Any]]:
        """Table rows: B, mean, std, stderr, min, max, 2/mean, mean / full."""
        return [
            [B, m, s, e, min(v), max(v), lr, m / self.full]
            for B, v, m, s, e, lr in zip(
                self.batch_sizes, self.values, self.mean, self.std, self.stderr, self.max_lr,
                strict=True,
            )
        ]  # fmt: skip


def batch_spectrum(
    obj: Objective,
    batch_sizes: Sequence[int | str] = (8, 32, 128, "full"),
    *,
    k: int = 1,
    samples: int = 5,
    curvature: str = "hessian",
    tol: float = 1e-6,
    seed: int = 0,
) -> BatchSpectrum:
    r"""The largest eigenvalue of mini-batch Hessians as the batch shrinks.

    For each size :math:`B`, ``samples`` batches are drawn without replacement from the data
    and :math:`\lambda_{\max}(H_B)` of each is found with :func:`hesse.eigs`. The mini-batch
    Hessian is the full one plus noise whose spectral norm grows as :math:`B` shrinks, so
    :math:`\mathbb{E}\,\lambda_{\max}(H_B)` rises above :math:`\lambda_{\max}(H)`; a step
    stable on every batch needs :math:`\eta \le 2/\lambda_{\max}(H_B)`. Where the noise term
    dominates (:math:`\lambda_{\max}(H_B) \propto 1/B`) the largest stable SGD step grows
    linearly with :math:`B`, and for Adam as :math:`\sqrt B` (Granziol et al. 2022, "Learning
    rates as a function of batch size: a random matrix theory approach to neural network
    training"); ``lr_exponent`` is the measured exponent of :math:`2/\mathbb{E}\lambda_{\max}`.

    Args:
        obj: The objective over all data (batches of tensors with samples on dim 0).
        batch_sizes: Sizes to draw, ``"full"`` for all data (one draw).
        k: Eigenvalues per batch (only the largest is reported).
        samples: Batches drawn per size.
        curvature: ``"hessian"``, ``"ggn"`` or ``"fisher"``.
        tol: Relative residual tolerance of Lanczos.
        seed: Seed of the draws and the Lanczos starts.

    Returns:
        BatchSpectrum.

    Raises:
        ValueError: a size above the number of samples, or ``samples < 1``.

    Example:
        >>> from torch import nn
        >>> x = torch.randn(64, 3, dtype=torch.float64)
        >>> obj = Objective(nn.Linear(3, 1).double(), [(x, x[:, :1])], nn.functional.mse_loss)
        >>> spec = batch_spectrum(obj, (4, "full"), samples=3)
        >>> spec.mean[0] > spec.full, spec.batch_sizes
        (True, (4, 64))
    """
    data = one_batch(list(obj.batches()), "batch_spectrum")
    n = samples_in(data, "batch_spectrum")
    sizes = tuple(n if B == "full" else int(B) for B in batch_sizes)
    if samples < 1 or any(not 1 <= B <= n for B in sizes):
        raise ValueError(
            f"batch_spectrum: sizes must lie in 1..{n} (the samples) and samples >= 1, got "
            f"{tuple(batch_sizes)} and {samples}."
        )
    gen = torch.Generator().manual_seed(seed)
    values, used = [], 0
    for B in sizes:
        draws = 1 if B == n else samples
        row = []
        for _ in range(draws):
            index = torch.randperm(n, generator=gen)[:B].sort().values
            found = _top(obj, rows_of(data, index), k, curvature, tol, seed)
            row.append(float(found.values[0]))
            used += found.n_matvecs
        values.append(tuple(row))
    full = _top(obj, data, k, curvature, tol, seed)
    return _summary(sizes, values, float(full.values[0]), n, used + full.n_matvecs)


def _summary(sizes, values, full: float, n: int, used: int) -> BatchSpectrum:
    t = [torch.tensor(v, dtype=torch.float64) for v in values]
    mean = tuple(float(v.mean()) for v in t)
    std = tuple(float(v.std()) if len(v) > 1 else 0.0 for v in t)
    stderr = tuple(s / math.sqrt(len(v)) for s, v in zip(std, t, strict=True))
    max_lr = tuple(2.0 / m for m in mean)
    part = [(math.log(B), math.log(lr)) for B, lr in zip(sizes, max_lr, strict=True) if B < n]
    slope = float("nan")
    if len({x for x, _ in part}) >= 2:
        X, Y = torch.tensor(part, dtype=torch.float64).T
        slope = float(((X - X.mean()) * (Y - Y.mean())).sum() / ((X - X.mean()) ** 2).sum())
    return BatchSpectrum(sizes, tuple(values), mean, std, stderr, full, n, max_lr, slope, used)


def _top(obj: Objective, batch: Any, k: int, curvature: str, tol: float, seed: int):
    """Top-``k`` eigenpairs of the curvature of ``obj``'s model and loss on one batch."""
    return eigs(curvature_operator(obj.with_data([batch]), curvature), k, tol=tol, seed=seed)
