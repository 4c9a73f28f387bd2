"""hesse's attribution methods on a workload: scores ``(n_query, n_train)`` in hesse's convention.

Every method runs on the model trained on the full training set (seed 0); the projected
ensemble also on the models of seeds 1 and 2 (TRAK's checkpoints, trained the same way).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from workloads import Workload

from hesse.influence import influence

CACHE = Path(__file__).parent / ".cache"
BATCH = 100
PROJECTION_DIM = 512

HESSE = {
    "exact": {"ihvp": "exact", "curvature": "ggn"},
    "cg": {"ihvp": "cg", "curvature": "ggn", "tol": 1e-4, "max_matvecs": 300},
    "lissa": {"ihvp": "lissa", "curvature": "ggn", "tol": 1e-3, "max_matvecs": 100},
    "woodbury": {"ihvp": "woodbury"},
    "kfac": {"ihvp": "kfac"},
    "ekfac": {"ihvp": "ekfac"},
    "projected": {"ihvp": "projected", "projection_dim": PROJECTION_DIM},
    "projected-ggn": {"ihvp": "projected", "projection_dim": PROJECTION_DIM, "curvature": "ggn"},
    "projected-ens3": {"ihvp": "projected", "projection_dim": PROJECTION_DIM, "ensemble": 3},
}
"""hesse's methods as benchmarked; ``ensemble`` is the number of checkpoints (seeds 0..)."""


def trained(
    w: Workload, seed: int = 0, y: torch.Tensor | None = None, tag: str = ""
) -> torch.nn.Module:
    """The model of ``w`` trained on all its training points (cached under .cache/)."""
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"{w.name}{tag}-full-{seed}.pt"
    model = w.make(seed)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    model = w.train(torch.arange(len(w.x)), seed, y)
    torch.save(model.state_dict(), path)
    return model


def batches(x: torch.Tensor, y: torch.Tensor) -> list:
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]


def hesse_scores(
    w: Workload, method: str, damping: float, *, y: torch.Tensor | None = None, tag: str = "",
    queries: tuple | None = None,
) -> tuple[torch.Tensor, float, dict]:  # fmt: skip
    """``(scores, seconds, result.to_dict())`` of one hesse method at one damping.

    ``queries`` (x, y) replaces the workload's queries (self-influence: the training set).
    """
    settings = dict(HESSE[method])
    if w.output == "loss" and method in ("kfac", "ekfac"):
        # exact GGN factors of a 92-way softmax cost 92 backward passes per batch: the LM
        # uses the empirical Fisher's factors (one pass), as kronfluence's are one-sample MC
        settings["curvature"] = "fisher"
    ensemble = settings.pop("ensemble", 1)
    y = w.y if y is None else y
    model = trained(w, 0, y, tag)
    if ensemble > 1:
        settings["checkpoints"] = [trained(w, s, y, tag) for s in range(ensemble)]
    xq, yq = queries if queries is not None else (w.xq, w.yq)
    start = time.perf_counter()
    r = influence(
        model, batches(w.x, y), batches(xq, yq), w.loss, damping=damping, seed=0, **settings
    )
    return r.scores, time.perf_counter() - start, r.to_dict()
