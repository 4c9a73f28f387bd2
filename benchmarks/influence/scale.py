"""Scale: 10^4 training images x 10 queries, woodbury vs damped CG, on the digits demo's CNN.

The training set is the digits training split augmented to 10,000 images (shifts by one pixel
and two noisy copies); the demo's CNN architecture (3,658 parameters) is trained on it with
SGD and weight decay. Woodbury inverts the damped empirical Fisher of the 10^4 per-sample
gradients exactly; CG solves the same damped empirical Fisher (FisherOperator, so the error
is the solver's alone) and the damped GGN (a different curvature: agreement, not error).
"""

from __future__ import annotations

import time

import problems as P
import torch
import torch.nn.functional as F
from scipy import stats

import hesse
from hesse.demo.digits import Config, build_model
from hesse.influence import influence


def augmented(n: int = 10_000, seed: int = 0):
    x, y, xt, yt = P.digits()
    x, xt = x.float().reshape(-1, 1, 8, 8), xt.float().reshape(-1, 1, 8, 8)
    g = torch.Generator().manual_seed(seed)
    noisy = [(x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1) for _ in range(2)]
    shifted = [x.roll(s, dim) for s in (1, -1) for dim in (2, 3)]
    X, Y = torch.cat([x, *shifted, *noisy])[:n], y.repeat(7)[:n]
    return X, Y, xt, yt


def trained(X, Y, seed: int = 0, epochs: int = 8) -> torch.nn.Module:
    model = build_model(Config(seed=seed))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(X), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            opt.step()
    return model.eval()


def agreement(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> dict:
    """Relative error, Spearman per query (mean) and overlap of the top-k helpful points."""
    spear = [stats.spearmanr(a[q], b[q])[0] for q in range(a.shape[0])]
    top = [
        len(set(a[q].topk(k).indices.tolist()) & set(b[q].topk(k).indices.tolist())) / k
        for q in range(a.shape[0])
    ]
    return {
        "relative_error": float((a - b).norm() / b.norm()),
        "spearman": float(sum(spear) / len(spear)),
        f"top{k}_overlap": sum(top) / len(top),
    }


def run(quick: bool) -> dict:
    n = 2_000 if quick else 10_000
    X, Y, xt, yt = augmented(n)
    start = time.perf_counter()
    model = trained(X, Y, epochs=2 if quick else 8)
    train_seconds = time.perf_counter() - start
    data = [(X[i : i + 2500], Y[i : i + 2500]) for i in range(0, n, 2500)]
    queries = [(xt[:10], yt[:10])]
    fisher = hesse.FisherOperator(hesse.Objective(model, data, F.cross_entropy))
    lam_max = float(hesse.eigs(fisher, k=1, tol=1e-3).values[0])
    damping = 0.05 * lam_max
    runs = {}
    for name, kwargs in [
        ("woodbury", {"ihvp": "woodbury"}),
        ("cg (empirical Fisher)", {"ihvp": "cg", "curvature": "fisher", "tol": 1e-4}),
        (
            "cg (GGN, 40 products per query)",
            {"ihvp": "cg", "curvature": "ggn", "tol": 1e-4, "max_matvecs": 40},
        ),
    ]:
        if quick and "GGN" in name:
            continue
        r = influence(model, data, queries, F.cross_entropy, damping=damping, **kwargs)
        runs[name] = r
        print("scale", name, r.seconds, r.inverse.n_matvecs, flush=True)
    ref = runs["woodbury"].scores
    rows = []
    for name, r in runs.items():
        rows.append(
            {
                "method": name,
                "seconds": r.seconds,
                "inverse_seconds": r.inverse.seconds,
                "n_matvecs": r.inverse.n_matvecs,
                "converged": r.converged,
                "max_residual": float(r.inverse.residuals.max()),
                "memory_bytes": r.memory,
            }
            | agreement(r.scores, ref)
        )
    return {
        "n_train": n,
        "d": fisher.shape[0],
        "queries": 10,
        "damping": damping,
        "fisher_lam_max": lam_max,
        "train_seconds": train_seconds,
        "train_accuracy": P.accuracy(model, X, Y),
        "test_accuracy": P.accuracy(model, xt, yt),
        "rows": rows,
    }
