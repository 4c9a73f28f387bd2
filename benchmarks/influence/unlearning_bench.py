"""Unlearning a random 5% of digits: Newton and IAU against retraining without it."""

from __future__ import annotations

import time

import problems as P
import torch
import torch.nn.functional as F

import hesse
from hesse.influence import unlearn


def split(n: int, share: float = 0.05, seed: int = 2):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    forget = torch.zeros(n, dtype=torch.bool)
    forget[perm[: int(share * n)]] = True
    return forget


def metrics(model, reference, data, warm=None) -> dict:
    x, y, xt, yt, forget = data
    near = {} if warm is None else {"distance_to_warm_retrain": _distance(model, warm)}
    return near | {
        "distance_to_retrained": _distance(model, reference),
        "forget_loss": P.mean_loss(model, x[forget], y[forget]),
        "forget_accuracy": P.accuracy(model, x[forget], y[forget]),
        "remain_accuracy": P.accuracy(model, x[~forget], y[~forget]),
        "test_accuracy": P.accuracy(model, xt, yt),
        "mia_auc": P.mia_auc(model, x[forget], y[forget], xt, yt),
        "loss_gap": P.mean_loss(model, xt, yt) - P.mean_loss(model, x[forget], y[forget]),
    }


def _distance(a, b) -> float:
    return float((P.flat(a) - P.flat(b)).norm())


def table(original, retrain, retrain_seconds, wd, data, newton_kwargs, warm=None) -> list[dict]:
    x, y, _, _, forget = data
    rows = [
        {"method": "original"} | metrics(original, retrain, data, warm),
        {"method": "retrain", "seconds": retrain_seconds} | metrics(retrain, retrain, data, warm),
    ]
    if warm is not None:
        rows.append({"method": "retrain (warm)"} | metrics(warm, retrain, data, warm))
    for method, kwargs in (("newton", newton_kwargs), ("iau", {})):
        r = unlearn(
            original,
            [(x[forget], y[forget])],
            [(x[~forget], y[~forget])],
            F.cross_entropy,
            method=method,
            weight_decay=wd,
            **kwargs,
        )
        rows.append(
            {
                "method": method,
                "seconds": r.seconds,
                "n_matvecs": r.n_matvecs,
                "step_size": r.step_size,
            }
            | metrics(r.model, retrain, data, warm)
        )
        print("unlearn", rows[-1], flush=True)
    return rows


def run(quick: bool) -> dict:
    x, y, xt, yt = P.digits()
    forget = split(len(y))
    data = (x, y, xt, yt, forget)
    out = {"forget": int(forget.sum()), "remain": int((~forget).sum())}
    lam = 1e-3
    W = P.lr_fit(x, y, lam)
    start = time.perf_counter()
    W_retrain = P.lr_fit(x[~forget], y[~forget], lam)  # from scratch (convex: same optimum)
    seconds = time.perf_counter() - start
    out["logistic"] = {
        "weight_decay": lam,
        "rows": table(P.lr_model(W), P.lr_model(W_retrain), seconds, lam, data, {"ihvp": "cg"}),
    }
    wd = 1e-3
    original = P.mlp_fit(P.mlp(), x, y, wd)
    start = time.perf_counter()
    retrain = P.mlp_fit(P.mlp(), x[~forget], y[~forget], wd)  # same init, without the forget set
    seconds = time.perf_counter() - start
    warm = P.mlp_fit(P.copy_of(original), x[~forget], y[~forget], wd)
    obj = hesse.Objective(original, [(x[~forget], y[~forget])], F.cross_entropy)
    lam_min = float(
        hesse.eigs(hesse.HessianOperator(obj), k=1, which="smallest", max_matvecs=600).values[0]
    )
    extra = max(0.0, -1.1 * (lam_min + wd)) + 1e-3
    out["mlp"] = {
        "weight_decay": wd,
        "extra_damping": extra,
        "lam_min_remain_hessian": lam_min,
        "rows": table(original, retrain, seconds, wd, data, {"ihvp": "cg", "damping": extra}, warm),
    }
    return out
