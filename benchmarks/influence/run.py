"""Influence, unlearning and hypergradients against retraining; scale of woodbury vs damped CG.

    .venv/bin/python benchmarks/influence/run.py [--quick]

Writes benchmarks/influence/RESULTS.md and results.json (with --quick: /tmp/hesse-influence).
Every "actual" number comes from retraining (exact Newton for the logistic regression, L-BFGS
to a tiny gradient for the MLP); see problems.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy import stats

sys.path.insert(0, str(Path(__file__).parent))
import problems as P  # noqa: E402
import scale  # noqa: E402
import unlearning_bench  # noqa: E402

import hesse  # noqa: E402
from hesse.influence import hypergradient, influence  # noqa: E402

HERE = Path(__file__).parent


def correlations(pred: torch.Tensor, actual: torch.Tensor) -> dict:
    return {
        "pearson": float(stats.pearsonr(pred, actual)[0]),
        "spearman": float(stats.spearmanr(pred, actual)[0]),
        "slope": float(pred @ actual / (actual @ actual)),
        "points": len(actual),
    }


def loo_logistic(quick: bool) -> dict:
    """Predicted vs retrained change of the test loss, L2 logistic regression on digits."""
    x, y, xt, yt = P.digits()
    nq = 20
    xq, yq = xt[:nq], yt[:nq]
    out = {"queries": nq, "n_train": len(y), "rows": []}
    for lam in (1e-3, 1e-2):
        W = P.lr_fit(x, y, lam)
        model, before = P.lr_model(W), float(P.lr_loss(W, xq, yq))
        removed = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))[:50]
        actual = []
        for i in removed:
            w = torch.ones(len(y), dtype=P.DT)
            w[i] = 0.0
            actual.append(float(P.lr_loss(P.lr_fit(x, y, lam, w, start=W), xq, yq)) - before)
        actual = torch.tensor(actual, dtype=P.DT)
        # LiSSA's depth is kappa ln(1/tol): at lambda = 1e-3 (kappa ~ 480) 6,624 products per
        # query, 176 s for 20 queries in a --quick run; the full run keeps it to lambda = 1e-2
        for ihvp in ("exact", "cg") if lam < 1e-2 and not quick else ("exact", "cg", "lissa"):
            r = influence(model, [(x, y)], [(xq, yq)], F.cross_entropy, ihvp=ihvp, damping=lam)
            row = {
                "lambda": lam,
                "ihvp": ihvp,
                "seconds": r.seconds,
                "n_matvecs": r.inverse.n_matvecs,
                "converged": r.converged,
                "lissa_scale": r.inverse.scale,
                "lissa_depth": r.inverse.depth,
                "lam_max": r.inverse.lam_max,
            }
            out["rows"].append(row | correlations(r.scores.mean(0)[removed], actual))
            print("loo", out["rows"][-1], flush=True)
    return out


def loo_mlp(quick: bool) -> dict:
    """The same for a 64-32-10 tanh MLP with weight decay: non-convex, so damped."""
    x, y, xt, yt = P.digits()
    wd, nq = 1e-3, 20
    xq, yq = xt[:nq], yt[:nq]
    model = P.mlp_fit(P.mlp(), x, y, wd)
    theta, before = P.flat(model), P.mean_loss(model, xq, yq)
    removed = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))[
        : 10 if quick else 40
    ]
    actual = []
    for i in removed:
        w = torch.ones(len(y), dtype=P.DT)
        w[i] = 0.0
        actual.append(P.mean_loss(P.mlp_fit(P.copy_of(model), x, y, wd, w), xq, yq) - before)
    actual = torch.tensor(actual, dtype=P.DT)
    obj = hesse.Objective(model, [(x, y)], F.cross_entropy)
    H = hesse.HessianOperator(obj)
    lam_min = float(hesse.eigs(H, k=1, which="smallest", max_matvecs=600).values[0])
    out = {
        "weight_decay": wd,
        "d": len(theta),
        "lam_min_data_hessian": lam_min,
        "gradient_norm": float((obj.gradient() + wd * theta).norm()),
        "rows": [],
    }
    for curvature, extra in (("hessian", 0.0), ("hessian", 1e-2), ("ggn", 0.0), ("ggn", 1e-2)):
        r = influence(
            model,
            [(x, y)],
            [(xq, yq)],
            F.cross_entropy,
            ihvp="cg",
            damping=wd + extra,
            curvature=curvature,
        )
        row = {
            "curvature": curvature,
            "damping": wd + extra,
            "converged": r.converged,
            "n_matvecs": r.inverse.n_matvecs,
            "seconds": r.seconds,
        }
        out["rows"].append(row | correlations(r.scores.mean(0)[removed], actual))
        print("mlp", out["rows"][-1], flush=True)
    return out


def hyper(quick: bool) -> dict:
    """IFT hypergradient vs finite differences of retraining; then a few steps of HPO."""
    x, y, xt, yt = P.digits()
    xv, yv, xtest, ytest = xt[:180], yt[:180], xt[180:], yt[180:]
    lam, h = 1e-2, 1e-6
    W = P.lr_fit(x, y, lam)
    model = P.lr_model(W)
    inner = hesse.Objective(model, [(x, y)], F.cross_entropy)
    outer = hesse.Objective(model, [(xv, yv)], F.cross_entropy)
    checks = []
    for ihvp in ("exact", "cg", "lissa"):
        r = hypergradient(inner, outer, torch.tensor(lam, dtype=P.DT), ihvp=ihvp, tol=1e-9)
        checks.append(
            {
                "ihvp": ihvp,
                "ift": float(r.value),
                "seconds": r.seconds,
                "n_matvecs": r.inverse.n_matvecs,
            }
        )
    up = P.lr_loss(P.lr_fit(x, y, lam + h, start=W), xv, yv)
    down = P.lr_loss(P.lr_fit(x, y, lam - h, start=W), xv, yv)
    fd = float(up - down) / (2 * h)
    for c in checks:
        c |= {"finite_difference": fd, "relative_error": abs(c["ift"] - fd) / abs(fd)}
    per = hypergradient(inner, outer, torch.tensor([lam, lam], dtype=P.DT), ihvp="exact")
    fd_per = []
    for cols in (slice(0, 64), slice(64, 65)):  # the weight's decay, the bias's
        mask = torch.zeros(10, 65, dtype=P.DT)
        mask[:, cols] = 1.0
        hi = P.lr_loss(P.lr_fit(x, y, lam + h * mask, start=W), xv, yv)
        lo = P.lr_loss(P.lr_fit(x, y, lam - h * mask, start=W), xv, yv)
        fd_per.append(float(hi - lo) / (2 * h))
    steps = optimize_decay(x, y, xv, yv, xtest, ytest, 3 if quick else 6)
    return {
        "checks": checks,
        "per_tensor": {"ift": per.value.tolist(), "finite_difference": fd_per},
        "hpo": steps,
    }


def optimize_decay(x, y, xv, yv, xtest, ytest, n_steps: int) -> list[dict]:
    """Gradient descent on log(lambda) with the IFT hypergradient, retraining at each step."""
    log_lam, lr, W, rows = torch.tensor(0.0, dtype=P.DT), 20.0, None, []
    for step in range(n_steps + 1):
        lam = float(log_lam.exp())
        W = P.lr_fit(x, y, lam, start=W)
        model = P.lr_model(W)
        inner = hesse.Objective(model, [(x, y)], F.cross_entropy)
        outer = hesse.Objective(model, [(xv, yv)], F.cross_entropy)
        r = hypergradient(inner, outer, torch.tensor(lam, dtype=P.DT), ihvp="cg")
        g_log = float(r.value) * lam  # d/dlog(lambda)
        rows.append(
            {
                "step": step,
                "lambda": lam,
                "validation_loss": r.outer_value,
                "test_loss": P.mean_loss(model, xtest, ytest),
                "test_accuracy": P.accuracy(model, xtest, ytest),
                "d_dloglambda": g_log,
            }
        )
        print("hpo", rows[-1], flush=True)
        log_lam = log_lam - max(-1.5, min(1.5, lr * g_log))  # lambda changes by e^1.5 at most
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path("/tmp/hesse-influence") if args.quick else HERE
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or "cpu",
        },
        "loo_logistic": loo_logistic(args.quick),
        "loo_mlp": loo_mlp(args.quick),
        "unlearning": unlearning_bench.run(args.quick),
        "hypergradient": hyper(args.quick),
        "scale": scale.run(args.quick),
    }
    results["seconds"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    from report import markdown

    (out / "RESULTS.md").write_text(markdown(results))
    print(f"wrote {out}/RESULTS.md and results.json in {results['seconds']:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
