"""Timing, errors and distances shared by the tasks."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from bench.workloads import Workload


def timed(fn: Callable, *args, **kwargs):
    """``(fn(*args, **kwargs), seconds)``."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def best_time(fn: Callable, reps: int) -> float:
    """Least wall time of ``reps`` calls after one warm-up call.

    The minimum, not the median: the machine is shared, and other processes only ever add
    time (the ``timeit`` convention).
    """
    fn()
    return min(timed(fn)[1] for _ in range(reps))


def gradient_fn(w: Workload) -> Callable[[], None]:
    """One full-data gradient in plain PyTorch: the yardstick of the HVP cost ratio."""
    params = [p for p in w.model.parameters() if p.requires_grad]

    def run():
        for x, y in w.batches:
            torch.autograd.grad(w.loss(w.model(x), y) * (len(x) / w.n_samples), params)

    return run


def eig_error(values: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |λ_i - λ_i*| / |λ_1*|, max |λ_i - λ_i*| / |λ_i*|) over the k values returned."""
    k = len(values)
    diff = np.abs(np.asarray(values[:k]) - ref[:k])
    return float(diff.max() / abs(ref[0])), float((diff / np.abs(ref[:k])).max())


def wasserstein1(nodes: np.ndarray, weights: np.ndarray, eigvals: np.ndarray) -> float:
    """W1 between an SLQ measure (probes averaged) and the exact spectral measure.

    Both are discrete probability measures on the line; W1 is the integral of the absolute
    difference of their cumulative distribution functions.
    """
    ok = np.isfinite(nodes) & (weights > 0)
    x = nodes[ok]
    p = weights[ok] / weights[ok].sum()
    q = np.full(len(eigvals), 1.0 / len(eigvals))
    pts = np.concatenate([x, eigvals])
    mass = np.concatenate([p, -q])
    order = np.argsort(pts)
    cdf_diff = np.cumsum(mass[order])[:-1]
    return float(np.sum(np.abs(cdf_diff) * np.diff(pts[order])))
