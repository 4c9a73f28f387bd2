"""Sinkhorn-Newton-Sparse (hesse.ot) against POT's Sinkhorn variants; writes RESULTS.md.

Problems: empirical point clouds (2-D), discretized 1-D densities and 2-D densities on a grid,
each with the W1 (|x-y|) and W2 (|x-y|^2) cost scaled to max 1, at several entropic
regularizations. Every solver runs to marginal error 1e-9 (the Euclidean norm of both
marginal violations, POT's stopping quantity) or its iteration cap; we report iterations,
wall time on one core, the reached error and |cost - cost_SNS|.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ot/run.py [--quick]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

import ot
from hesse.ot import sinkhorn_newton

HERE = Path(__file__).parent
TOL = 1e-9
CAPS = {"sinkhorn": 20_000, "sinkhorn_stabilized": 20_000, "sinkhorn_log": 500}


def clouds(n, rng):
    x = rng.normal(size=(n, 2))
    y = np.concatenate([rng.normal(size=(n // 2, 2)) * 0.5 + 2, rng.normal(size=(n - n // 2, 2))])
    return np.full(n, 1 / n), np.full(n, 1 / n), x, y


def density_1d(n, rng):
    x = np.linspace(0, 1, n)[:, None]
    a = np.exp(-((x[:, 0] - 0.3) ** 2) / 0.01) + 0.5 * np.exp(-((x[:, 0] - 0.7) ** 2) / 0.005)
    b = np.exp(-((x[:, 0] - 0.55) ** 2) / 0.02) + 1e-3
    return a / a.sum(), b / b.sum(), x, x


def density_2d(n, rng):
    k = int(round(np.sqrt(n)))
    g = np.stack(np.meshgrid(np.linspace(0, 1, k), np.linspace(0, 1, k)), -1).reshape(-1, 2)
    a = np.exp(-((g - 0.3) ** 2).sum(1) / 0.02) + 1e-3
    b = np.exp(-((g - [0.7, 0.6]) ** 2).sum(1) / 0.01) + np.exp(
        -((g - [0.3, 0.8]) ** 2).sum(1) / 0.01
    )
    b = b + 1e-3
    return a / a.sum(), b / b.sum(), g, g


def cost(x, y, p):
    C = ot.dist(x, y, metric="euclidean") ** p
    return C / C.max()


def error(P, a, b):
    return float(np.hypot(np.linalg.norm(P.sum(1) - a), np.linalg.norm(P.sum(0) - b)))


def run_pot(method, a, b, C, reg):
    t = time.perf_counter()
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        P, log = ot.sinkhorn(
            a, b, C, reg, method=method, stopThr=TOL, numItermax=CAPS[method], log=True
        )
    seconds = time.perf_counter() - t
    ok = bool(np.all(np.isfinite(P)))
    err = error(P, a, b) if ok else float("nan")
    n_iter = int(log["n_iter"] if "n_iter" in log else log["niter"])
    return {
        "iterations": n_iter,
        "seconds": seconds,
        "error": err,
        "cost": float(np.vdot(C, P)) if ok else float("nan"),
    }


def run_sns(a, b, C, reg):
    t = time.perf_counter()
    r = sinkhorn_newton(a, b, C, reg, tol=TOL, max_newton=300)
    seconds = time.perf_counter() - t
    return {
        "iterations": r.sinkhorn_iterations + r.newton_iterations,
        "newton": r.newton_iterations,
        "cg": r.cg_iterations,
        "nnz_frac": r.hessian_nnz / C.size,
        "seconds": seconds,
        "error": r.marginal_error,
        "cost": r.cost,
    }


def main(quick: bool) -> None:
    rng = np.random.default_rng(0)
    n = 200 if quick else 500
    problems = {"clouds": clouds, "density-1d": density_1d, "density-2d": density_2d}
    regs = [1e-2, 1e-3] if quick else [1e-2, 3e-3, 1e-3]
    rows = []
    for name, make in problems.items():
        a, b, x, y = make(n if name != "density-2d" else (22 if quick else 24) ** 2, rng)
        for p in (1, 2):
            C = cost(x, y, p)
            for reg in regs:
                row = {
                    "problem": name,
                    "cost": f"W{p}",
                    "n": len(a),
                    "reg": reg,
                    "sns": run_sns(a, b, C, reg),
                }
                for method in CAPS:
                    row[method] = run_pot(method, a, b, C, reg)
                rows.append(row)
                print(json.dumps(row), flush=True)
    (HERE / "results.json").write_text(json.dumps(rows, indent=1))
    write_markdown(rows)


def cell(r, ref_cost):
    if not np.isfinite(r["error"]):
        return "fails (NaN)"
    reached = r["error"] <= TOL
    text = f"{r['iterations']} / {r['seconds']:.2f}s"
    if not reached:
        return text + f" (cap; err {r['error']:.0e})"
    return text + f" (Δcost {abs(r['cost'] - ref_cost):.0e})"


def write_markdown(rows):
    lines = [
        "# Sinkhorn-Newton-Sparse (hesse.ot) vs POT",
        "",
        "`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ot/run.py` (one CPU core, shared machine;",
        f"POT {ot.__version__}, float64). Each cell: iterations / wall time to marginal error",
        f"{TOL:g} (Euclidean norm of both marginal violations; POT's own stopping test, checked",
        "every 10 iterations), and |<C,P> - <C,P_SNS>|. SNS iterations = Sinkhorn warm-up sweeps",
        "+ Newton steps (each O(nm) plus CG on the kept entries). Caps: "
        + ", ".join(f"{k} {v}" for k, v in CAPS.items())
        + "; 'cap' means the target error was not reached.",
        "",
        "| problem | cost | n | reg | SNS (Newton steps, CG its, kept) | POT sinkhorn "
        "| POT sinkhorn_stabilized | POT sinkhorn_log |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["sns"]
        sns = (
            f"**{s['iterations']} / {s['seconds']:.2f}s** "
            f"({s['newton']}, {s['cg']}, {100 * s['nnz_frac']:.1f}%)"
            if s["error"] <= TOL
            else f"{s['iterations']} / {s['seconds']:.2f}s (err {s['error']:.0e})"
        )
        pots = " | ".join(cell(r[m], s["cost"]) for m in CAPS)
        lines.append(f"| {r['problem']} | {r['cost']} | {r['n']} | {r['reg']:g} | {sns} | {pots} |")
    lines += ["", *summary(rows)]
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")


def summary(rows):
    """Counts behind the paper's claims: iterations and wall time against POT's sinkhorn."""
    done = [r for r in rows if r["sns"]["error"] <= TOL]
    pot_fail = [r for r in done if not r["sinkhorn"]["error"] <= TOL]
    both = [r for r in done if r["sinkhorn"]["error"] <= TOL and r["sns"]["newton"] > 0]
    ratios = sorted(r["sinkhorn"]["iterations"] / r["sns"]["iterations"] for r in both)
    faster = [r for r in done if r["sns"]["seconds"] < r["sinkhorn"]["seconds"]]
    worst = max(
        abs(r["sns"]["cost"] - r[m]["cost"]) for r in rows for m in CAPS if r[m]["error"] <= TOL
    )
    return [
        "## Reading",
        "",
        f"- SNS reached {TOL:g} in {len(done)} of {len(rows)} cases; POT's `sinkhorn` did not "
        f"within {CAPS['sinkhorn']} iterations in {len(pot_fail)} of them.",
        f"- Where both converged and SNS took Newton steps ({len(both)} cases), POT `sinkhorn` "
        f"needed {ratios[0]:.1f}x to {ratios[-1]:.1f}x the iterations of SNS (median "
        f"{ratios[len(ratios) // 2]:.1f}x); where POT hit its cap the ratio exceeds "
        f"{CAPS['sinkhorn']}/(SNS iterations). The paper's 'orders of magnitude fewer "
        "iterations' holds at small reg; at large reg Sinkhorn converges in the warm-up and SNS "
        "is plain Sinkhorn.",
        f"- Wall time: SNS was faster than POT `sinkhorn` in {len(faster)} of {len(done)} cases "
        "(the small-reg ones); at large reg POT's plain matrix-vector loop is faster per sweep "
        "than our stabilized sweeps plus plan evaluations. Timings are single runs on a shared "
        "machine (other jobs were running), so read them as factors, not exact seconds.",
        f"- Largest |cost - cost_SNS| over every converged POT run: {worst:.1e} (target 1e-8).",
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller problems, two regs")
    parser.add_argument(
        "--tables", action="store_true", help="rewrite RESULTS.md from results.json"
    )
    args = parser.parse_args()
    if args.tables:
        write_markdown(json.loads((HERE / "results.json").read_text()))
    else:
        main(args.quick)
