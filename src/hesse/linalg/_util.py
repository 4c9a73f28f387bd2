"""Shared plumbing of the algorithms: operator access, random probes, confidence intervals."""

from __future__ import annotations

from typing import Any

import torch
from scipy import stats
from tqdm.auto import tqdm

from ..operators.base import infer_tags


class Counted:
    """Applies ``A`` (an operator or a dense tensor) and counts the columns it was applied to."""

    def __init__(self, A: Any, progress: bool = False, total: int | None = None, desc: str = ""):
        if len(A.shape) != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"expected a square operator, got shape {tuple(A.shape)}.")
        self.A, self.d = A, A.shape[0]
        self.dtype, self.device = A.dtype, A.device
        self.n = 0
        self.bar = tqdm(total=total, desc=desc, unit="matvec", leave=False, disable=not progress)

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        self.n += V.shape[1]
        self.bar.update(V.shape[1])
        return self.A @ V

    def close(self) -> None:
        self.bar.close()


def tags_of(A: Any) -> frozenset[str]:
    """Declared structure of an operator; inferred for a dense tensor."""
    if isinstance(A, torch.Tensor):
        return infer_tags(A)
    return getattr(A, "tags", frozenset())  # duck-typed operators without tags declare nothing


def generator(seed: int) -> torch.Generator:
    """The CPU generator all probes come from: the same numbers on any device or process."""
    return torch.Generator().manual_seed(int(seed))


def rademacher(gen: torch.Generator, d: int, k: int, like: Counted) -> torch.Tensor:
    """``(d, k)`` random signs (Hutchinson 1989 probes)."""
    z = torch.randint(0, 2, (d, k), generator=gen, dtype=torch.int8) * 2 - 1
    return z.to(device=like.device, dtype=like.dtype)


def gaussian(gen: torch.Generator, d: int, k: int, like: Counted) -> torch.Tensor:
    """``(d, k)`` standard normal entries, drawn in float64 on the CPU."""
    z = torch.randn(d, k, generator=gen, dtype=torch.float64)
    return z.to(device=like.device, dtype=like.dtype)


def mean_ci(samples: torch.Tensor) -> tuple[float, float, tuple[float, float]]:
    """Mean, standard error and Student-t 95% interval of i.i.d. ``samples`` (n,)."""
    x = samples.double()
    n = x.numel()
    mean = float(x.mean())
    if n < 2:
        return mean, float("inf"), (float("-inf"), float("inf"))
    se = float(x.std(unbiased=True)) / n**0.5
    half = float(stats.t.ppf(0.975, n - 1)) * se
    return mean, se, (mean - half, mean + half)
