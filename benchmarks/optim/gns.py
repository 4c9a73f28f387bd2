"""Gradient-normalized smoothness Newton (hesse.optim.gns_newton): logistic and softmax regression.

Reproduces the claim of Semenov, Jaggi & Doikov (2025): with approximate Hessians (GGN,
Fisher, KFAC) the gradient-regularized Newton method with the adaptive rule of Algorithm 1
converges globally at a linear rate. Compared with gradient descent (Armijo backtracking),
the same method with the exact Hessian, and scipy's L-BFGS-B. Target: ||grad|| <= 1e-10.

Data (sklearn, standardized, float64): breast-cancer (569 x 30, 2 classes: logistic
regression as a 2-class softmax) and digits (1797 images projected on their 10 leading
principal components, 10 classes); 10% of the labels are redrawn at random (seed 0) so that
the data are not separable and the minimizer is finite.

Approximate curvatures: GGN (equal to the Hessian for a linear model: a check), empirical
Fisher, Monte-Carlo Fisher (one sampled label per input, fresh seed per iterate), KFAC of the
GGN, and Böhning's fixed bound (1/2)(I - 11^T/k) (x) X^T X/n >= H (Böhning 1992).

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/optim/gns.py
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.optimize
import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler
from torch import nn

from hesse import FisherOperator, Objective
from hesse.optim import gns_newton

torch.set_num_threads(1)
HERE = Path(__file__).parent
TOL = 1e-10


def dataset(name):
    X, y = (
        load_breast_cancer(return_X_y=True) if name == "logistic" else load_digits(return_X_y=True)
    )
    X = StandardScaler().fit_transform(X)
    if name == "softmax":
        X = StandardScaler().fit_transform(PCA(10, random_state=0).fit_transform(X))
    rng = np.random.default_rng(0)
    k = int(y.max()) + 1
    flip = rng.random(len(y)) < 0.1
    y = np.where(flip, rng.integers(0, k, len(y)), y)
    return torch.tensor(X), torch.tensor(y), k


def objective(X, y, k):
    torch.manual_seed(0)
    model = nn.Linear(X.shape[1], k).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    return Objective(model, [(X, y)], loss=F.cross_entropy)


def rate(norms):
    """Geometric-mean contraction of ||g|| per iteration over the run."""
    norms = [n for n in norms if n > 0]
    return (norms[-1] / norms[0]) ** (1 / max(1, len(norms) - 1))


def run_gns(X, y, k, curvature):
    obj = objective(X, y, k)
    t = time.perf_counter()
    if curvature == "mc-fisher":
        seeds = iter(range(10**6))
        curvature = lambda o: FisherOperator(o, kind="mc", seed=next(seeds))  # noqa: E731
    elif curvature == "bohning":
        curvature = bohning(X, k)
    r = gns_newton(obj, curvature=curvature, tol=TOL, max_iter=800, max_matvecs=100)
    norms = [h[1] for h in r.history]
    return {
        "iterations": r.iterations,
        "evaluations": r.n_evaluations,
        "matvecs": r.n_matvecs,
        "seconds": time.perf_counter() - t,
        "grad_norm": r.grad_norm,
        "loss": r.loss,
        "rate": rate(norms),
    }


def bohning(X, k):
    """Böhning's bound of the softmax cross-entropy Hessian, dense in the flat layout."""
    n, d = X.shape
    Xt = torch.cat([X, torch.ones(n, 1, dtype=X.dtype)], 1)
    B = torch.kron(0.5 * (torch.eye(k, dtype=X.dtype) - 1 / k), Xt.T @ Xt / n)
    # rows of B: class c, feature j (j = d is the bias); flat layout: weight (k, d), then bias
    order = [c * (d + 1) + j for c in range(k) for j in range(d)] + [
        c * (d + 1) + d for c in range(k)
    ]
    B = B[order][:, order]
    return lambda obj: B


def flat_fg(X, y, k):
    obj = objective(X, y, k)
    space = obj.space

    def fg(w):
        params = {n: t.requires_grad_(True) for n, t in space.split(torch.tensor(w)).items()}
        logits = X @ params["weight"].T + params["bias"]
        loss = F.cross_entropy(logits, y)
        g = torch.autograd.grad(loss, list(params.values()))
        return float(loss.detach()), torch.cat([t.reshape(-1) for t in g]).numpy()

    return fg, np.zeros(obj.dim)


def run_gd(X, y, k, max_iter=5_000):
    fg, w = flat_fg(X, y, k)
    t, L, evals = time.perf_counter(), 1.0, 1
    f, g = fg(w)
    norms = [np.linalg.norm(g)]
    it = 0
    while norms[-1] > TOL and it < max_iter:
        while True:  # Armijo backtracking on the step 1/L, then try a longer step next time
            w_new = w - g / L
            f_new, g_new = fg(w_new)
            evals += 1
            if f_new <= f - 0.5 / L * g @ g:
                break
            L *= 2
        w, f, g, L, it = w_new, f_new, g_new, L / 2, it + 1
        norms.append(np.linalg.norm(g))
    return {
        "iterations": it,
        "evaluations": evals,
        "matvecs": 0,
        "seconds": time.perf_counter() - t,
        "grad_norm": float(norms[-1]),
        "loss": f,
        "rate": rate(norms),
    }


def run_lbfgs(X, y, k):
    fg, w = flat_fg(X, y, k)
    norms, evals = [], [0]

    def counted(w):
        evals[0] += 1
        f, g = fg(w)
        return f, g

    def cb(intermediate_result):
        _, g = fg(intermediate_result.x)
        norms.append(np.linalg.norm(g))
        if norms[-1] <= TOL:
            raise StopIteration

    t = time.perf_counter()
    r = scipy.optimize.minimize(
        counted,
        w,
        jac=True,
        method="L-BFGS-B",
        callback=cb,
        options={"maxiter": 20_000, "gtol": 1e-14, "ftol": 0.0, "maxcor": 20},
    )
    f, g = fg(r.x)
    return {
        "iterations": int(r.nit),
        "evaluations": evals[0],
        "matvecs": 0,
        "seconds": time.perf_counter() - t,
        "grad_norm": float(np.linalg.norm(g)),
        "loss": f,
        "rate": rate([np.linalg.norm(fg(w)[1])] + norms),
    }


def main():
    rows = []
    for problem in ("logistic", "softmax"):
        X, y, k = dataset(problem)
        curvatures = ("hessian", "ggn", "fisher", "mc-fisher", "kfac", "bohning")
        runs = {f"GNS ({c})": (run_gns, c) for c in curvatures}
        runs |= {"GD (Armijo)": (run_gd, None), "L-BFGS-B (scipy)": (run_lbfgs, None)}
        for name, (fn, arg) in runs.items():
            out = fn(X, y, k, arg) if arg else fn(X, y, k)
            row = {"problem": problem, "n": len(y), "d": X.shape[1] * k + k, "method": name, **out}
            rows.append(row)
            print(json.dumps(row), flush=True)
    (HERE / "gns.json").write_text(json.dumps(rows, indent=1))
    write_markdown(rows)


def reading(rows):
    """Which runs reached the target, and the measured rates, in words."""
    out = ["## Reading", ""]
    for problem in ("logistic", "softmax"):
        mine = [r for r in rows if r["problem"] == problem]
        hit = [f"{r['method']} {r['iterations']}" for r in mine if r["grad_norm"] <= TOL]
        miss = [f"{r['method']} (‖g‖ {r['grad_norm']:.0e})" for r in mine if r["grad_norm"] > TOL]
        out.append(
            f"- {problem}: reached 1e-10 (iterations): {', '.join(hit) or 'none'}; "
            f"stopped short: {', '.join(miss) or 'none'}."
        )
    out += [
        "- Linear convergence with approximate curvature: Fisher (empirical and Monte-Carlo)",
        "  and KFAC reach 1e-10 on softmax at mean contraction 0.63-0.96 per step; on logistic",
        "  (breast cancer, nearly separable, so the Hessian is tiny in some directions) every",
        "  approximate curvature still contracts at ~0.983-0.988 per step but needs more than",
        "  800 steps. The rate constant is set by how well the approximation matches the",
        "  Hessian; the exact Hessian (= GGN for a linear model, identical runs) converges in",
        "  9-17 steps. The adaptive rule rejects about every other trial step with approximate",
        "  curvature (evaluations ≈ 2 × iterations). Only the mean rate is recorded, not the",
        "  per-step shape.",
        "- Against the peers: exact-curvature GNS needs far fewer iterations than GD and L-BFGS;",
        "  in wall time on these small problems scipy's L-BFGS-B is the fastest to ~1e-9 (it",
        "  stopped on its own line-search test before 1e-10). Fisher, KFAC and Böhning's bound",
        "  are not competitive here: they are worth it where exact Hessian products are not",
        "  available or too costly, which is the paper's setting.",
    ]
    return out


def write_markdown(rows):
    lines = [
        "# Gradient-normalized smoothness Newton: logistic and softmax regression",
        "",
        "`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/optim/gns.py` (one CPU core, float64).",
        "Target ||grad|| <= 1e-10 from zero weights. GNS = `hesse.optim.gns_newton` (Algorithm 1",
        "of Semenov, Jaggi & Doikov 2025: step -(H + ||g||/gamma I)^-1 g by CG with at most 100",
        "products, gamma doubled on acceptance, halved on rejection) with the named curvature.",
        "Iterations = accepted steps; evaluations = loss+gradient passes; rate = geometric mean",
        "of ||g_{k+1}||/||g_k||. GNS stops at 800 iterations, GD at 5,000.",
        "",
        "| problem | n | d | method | iterations | evaluations | curvature products | time (s) "
        "| final ‖g‖ | final loss | rate |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r["problem"], r["n"], r["d"], r["method"], r["iterations"], r["evaluations"]]
        cells += [r["matvecs"], f"{r['seconds']:.2f}", f"{r['grad_norm']:.1e}"]
        cells += [f"{r['loss']:.12f}", f"{r['rate']:.3f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", *reading(rows)]
    (HERE / "gns.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--tables"]:  # rewrite gns.md from gns.json
        write_markdown(json.loads((HERE / "gns.json").read_text()))
    else:
        main()
