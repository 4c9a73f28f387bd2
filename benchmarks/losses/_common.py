"""Shared pieces of the loss benchmarks: data, a small MLP, training, curvature of the result."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import hesse
from hesse.analysis.outliers import find_outliers

HERE = Path(__file__).parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"


def setup() -> None:
    """One thread (a shared 2-core machine) and the cache folders."""
    torch.set_num_threads(1)
    CACHE.mkdir(exist_ok=True)
    RESULTS.mkdir(exist_ok=True)


def split(X, y, seed: int, test: float = 0.3, stratify: bool = True):
    """Standardised float32 train/test tensors from numpy arrays (stratified, seeded)."""
    from sklearn.model_selection import train_test_split

    Xa, Xb, ya, yb = train_test_split(
        X, y, test_size=test, random_state=seed, stratify=y if stratify else None
    )
    mu, sd = Xa.mean(0), Xa.std(0) + 1e-8
    f = lambda a: torch.tensor((a - mu) / sd, dtype=torch.float32)  # noqa: E731
    return f(Xa), torch.tensor(ya), f(Xb), torch.tensor(yb)


def mlp(d_in: int, d_out: int, hidden: int = 64, seed: int = 0) -> nn.Module:
    """Two hidden tanh layers (smooth: the Hessian exists everywhere)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
        nn.Linear(hidden, d_out),
    )  # fmt: skip


def train(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    loss: Callable,
    *,
    epochs: int,
    lr: float = 3e-3,
    batch: int = 64,
    seed: int = 0,
    cast: Callable | None = None,
) -> dict:
    """Adam on shuffled mini-batches; ``cast(y)`` turns labels into what ``loss`` reads."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    target = cast(y) if cast else y
    steps, t0 = 0, time.perf_counter()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(X), generator=g).split(batch):
            opt.zero_grad()
            loss(model(X[idx]), target[idx]).backward()
            opt.step()
            steps += 1
    model.eval()
    return {"steps": steps, "seconds": time.perf_counter() - t0}


@dataclass(frozen=True)
class Curvature:
    """λmax, trace and the outlier count of a trained model's Hessian (or GGN)."""

    lambda_max: float
    trace: float
    trace_stderr: float
    n_outliers: int | None
    expected: int | None
    top: tuple[float, ...]
    matvecs: int


def curvature(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    loss: Callable,
    *,
    n_classes: int | None,
    loss_name: str,
    k: int = 12,
    budget: int = 60,
    op: str = "hessian",
) -> Curvature:
    """``hesse.eigs`` (top ``k``) and ``hesse.trace`` (Hutch++) of the full-data curvature."""
    obj = hesse.Objective(model, (X, y), loss=loss)
    H = hesse.HessianOperator(obj) if op == "hessian" else hesse.GGNOperator(obj)
    e = hesse.eigs(H, k=k, max_matvecs=20 * k, seed=0)
    t = hesse.trace(H, budget=budget, seed=0)
    values = [float(v) for v in e.values]
    out = find_outliers(values, n_classes=n_classes, loss_name=loss_name, loss=float(obj.value()))
    return Curvature(
        values[0], t.value, t.stderr, out.n_outliers, out.expected, tuple(values),
        e.n_matvecs + t.n_matvecs,
    )  # fmt: skip


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor, k: int = 1) -> float:
    """Top-``k`` accuracy of a multi-class model."""
    with torch.no_grad():
        top = model(X).topk(k, dim=1).indices
    return (top == y[:, None]).any(1).float().mean().item()


def binary_scores(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict:
    """Accuracy, F1 and balanced accuracy of a one-logit binary model (threshold at 0)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    with torch.no_grad():
        pred = (model(X).reshape(-1) > 0).long().numpy()
    t = y.numpy()
    return {
        "acc": accuracy_score(t, pred),
        "f1": f1_score(t, pred, zero_division=0),
        "bacc": balanced_accuracy_score(t, pred),
    }


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats with 4 significant digits."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write(name: str, text: str, data: object) -> None:
    """``results/<name>.md`` and ``results/<name>.json``."""
    (RESULTS / f"{name}.md").write_text(text)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1, default=_plain))


def _plain(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return str(x)
