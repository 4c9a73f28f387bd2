"""The measurements: each function runs one study on one workload and returns table rows."""

from __future__ import annotations

import numpy as np
import torch

import hesse
from bench.adapters import Adapter
from bench.adapters.eigenthings_adapter import hvp_equal_weights
from bench.measure import best_time, eig_error, gradient_fn, timed, wasserstein1
from bench.reference import Reference, ReferenceHessian
from bench.workloads import Workload

TOL = 1e-6  # the accuracy every eigensolver is matched to (relative to |λ_1|)


def hvp_check(w: Workload, adapters: list[Adapter]) -> list[dict]:
    """One HVP of each tool against the float64 reference: catches a mis-weighted operator."""
    v = torch.randn(w.n_params, generator=torch.Generator().manual_seed(7))
    ref = ReferenceHessian(w).matmat(v.double())

    def err(h):
        return float((h.double() - ref).norm() / ref.norm())

    rows = [{"tool": a.name, "rel_err": err(a.hvp(v))} for a in adapters]
    rows.append(
        {
            "tool": "hessian-eigenthings (its default: equal batch weights)",
            "rel_err": err(hvp_equal_weights(w, v)),
        }
    )
    for r in rows:
        r["ok"] = r["rel_err"] < 1e-5
    return rows


def hvp_cost(w: Workload, adapters: list[Adapter], reps: int) -> list[dict]:
    """Best time of one full-data HVP over that of one full-data gradient."""
    grad_s = best_time(gradient_fn(w), reps)
    v = torch.randn(w.n_params, generator=torch.Generator().manual_seed(8))
    rows = []
    for a in adapters:
        s = best_time(lambda a=a: a.hvp(v), reps)
        rows.append({"tool": a.name, "hvp_s": s, "grad_s": grad_s, "ratio": s / grad_s})
        if a.name == "hesse":
            V = torch.randn(w.n_params, 10, generator=torch.Generator().manual_seed(9))
            s10 = best_time(lambda a=a, V=V: a.op @ V, reps) / 10
            rows.append(
                {
                    "tool": "hesse (block of 10, per column)",
                    "hvp_s": s10,
                    "grad_s": grad_s,
                    "ratio": s10 / grad_s,
                }
            )
    return rows


def cold_hvp(w: Workload) -> dict:
    """The first HVP of hesse on a fresh operator (builds and keeps the gradient graphs)."""
    a = hesse.HessianOperator(hesse.Objective(w.model, w.batches, loss=w.loss))
    v = torch.randn(w.n_params)
    return {"first_hvp_s": timed(lambda: a @ v)[1], "second_hvp_s": timed(lambda: a @ v)[1]}


def eigen(w: Workload, a: Adapter, ref: Reference, k: int, ladder: bool) -> list[dict]:
    """The k largest eigenvalues: HVPs, wall time and error of each run.

    The tool's default runs first; with ``ladder``, its other settings follow until one
    reaches ``TOL`` (the loosest that does).
    """
    rows = []
    settings = a.eig_settings(k)
    for i, s in enumerate(settings if ladder else settings[:1]):
        a.hvps = 0
        values, secs = timed(a.top_eigs, k, s)
        err, err_each = eig_error(values, ref.top)
        rows.append(
            {
                "tool": a.name,
                "k": k,
                "setting": s.label,
                "default": i == 0,
                "hvps": a.hvps,
                "seconds": secs,
                "rel_err": err,
                "rel_err_each": err_each,
                "ok": err <= TOL,
            }
        )
        if err <= TOL and (i > 0 or not a.ladder_loosens):
            break
        # Stop at the tool's accuracy floor: a looser ladder cannot pass once the tightest
        # setting (its default) failed; a tighter rung that does not halve the error has
        # stalled (float32 round-off in the tool's own scalars).
        stalled = i >= 2 and err > 0.5 * rows[-2]["rel_err"]
        if stalled or (a.ladder_loosens and not rows[0]["ok"]):
            break
    return rows


def matched(rows: list[dict], tool: str, k: int) -> dict | None:
    """The run of ``tool`` that reached TOL with the least wall time, if any."""
    ok = [r for r in rows if r["tool"] == tool and r["k"] == k and r["ok"]]
    return min(ok, key=lambda r: r["seconds"]) if ok else None


def trace_runs(w: Workload, adapters: list[Adapter], ref: Reference, budgets, seeds) -> list[dict]:
    """Each tool's default trace estimator and plain Hutchinson on the real operator."""
    rows = []
    for a in adapters:
        for method in ("default", "hutchinson"):
            for b in budgets:
                errs, secs, hits = [], 0.0, []
                a.hvps = 0
                for s in range(seeds):
                    if method == "default":
                        (val, ci), t = timed(a.trace, b, s)
                    else:
                        val, t = timed(a.hutchinson, b, s)
                        ci = None
                    errs.append(abs(val - ref.trace) / abs(ref.trace))
                    secs += t
                    if ci is not None:
                        hits.append(ci[0] <= ref.trace <= ci[1])
                rows.append(
                    {
                        "tool": a.name,
                        "method": method,
                        "budget": b,
                        "seeds": seeds,
                        "mean_rel_err": float(np.mean(errs)),
                        "coverage": float(np.mean(hits)) if hits else None,
                        "hvps": a.hvps / seeds,
                        "seconds_per_run": secs / seeds,
                    }
                )
    return rows


def trace_coverage(w: Workload, ref: Reference, budgets, seeds: int) -> list[dict]:
    """hesse.trace on the exact dense Hessian over many seeds: error and CI coverage."""
    H = ref.H
    rows = []
    for method in ("hutch++", "hutchinson"):
        for b in budgets:
            errs, hits = [], []
            for s in range(seeds):
                r = hesse.trace(H, budget=b, method=method, seed=s)
                errs.append(abs(r.value - ref.trace) / abs(ref.trace))
                hits.append(r.ci95[0] <= ref.trace <= r.ci95[1])
            rows.append(
                {
                    "workload": w.name,
                    "method": method,
                    "budget": b,
                    "seeds": seeds,
                    "mean_rel_err": float(np.mean(errs)),
                    "coverage": float(np.mean(hits)),
                }
            )
    return rows


def density(w: Workload, adapters: list[Adapter], ref: Reference) -> list[dict]:
    """SLQ with each tool's documented probe count (100 Lanczos steps) and its W1 distance."""
    width = float(ref.eigvals[-1] - ref.eigvals[0])
    rows = []
    for a in adapters:
        a.hvps = 0
        spec, secs = timed(a.density, 0)
        rows.append(
            {
                "tool": a.name,
                "probes": spec.nodes.shape[0] if a.name != "curvlinops" else 1,
                "hvps": a.hvps,
                "seconds": secs,
                "w1_rel": wasserstein1(spec.nodes, spec.weights, ref.eigvals) / width,
            }
        )
    return rows


def layers(
    w: Workload, adapters: list[Adapter], ref: Reference, budget: int, reps: int
) -> list[dict]:
    """All per-module traces: hesse.block_traces (one sweep) vs per-layer loops.

    Times are the best of ``reps`` runs (the same seed, so the same estimates).
    """
    scale = sum(abs(v) for v in ref.layers.values())
    rows = []

    def run(fn):
        results = [timed(fn, budget, 0) for _ in range(reps)]
        return results[0][0], min(t for _, t in results)

    for a in adapters:
        a.hvps = 0
        est, secs = run(a.layer_traces)
        err = sum(abs(est[k] - v) for k, v in ref.layers.items()) / scale
        rows.append(
            {
                "tool": a.name,
                "what": "all per-layer traces",
                "hvps": a.hvps // reps,
                "seconds": secs,
                "rel_err": err,
            }
        )
        if a.name == "hesse":
            a.hvps = 0
            (val, _), secs = run(a.trace)
            rows.append(
                {
                    "tool": "hesse",
                    "what": "one whole-model trace",
                    "hvps": a.hvps // reps,
                    "seconds": secs,
                    "rel_err": abs(val - ref.trace) / abs(ref.trace),
                }
            )
    return rows


def profile_hvp(w: Workload, rows: int = 8) -> dict[str, str]:
    """torch.profiler tables (top ops by self CPU time) of one hesse HVP and one gradient."""
    from torch.profiler import profile

    op = hesse.HessianOperator(hesse.Objective(w.model, w.batches, loss=w.loss))
    v = torch.randn(w.n_params)
    op @ v
    V = torch.randn(w.n_params, 10)
    op @ V
    out = {}
    for name, fn in (
        ("hesse HVP (steady state)", lambda: op @ v),
        ("gradient", gradient_fn(w)),
        ("hesse block of 10 HVPs (one call)", lambda: op @ V),
    ):
        fn()
        with profile() as prof:
            fn()
        out[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return out


def eigs_overhead(w: Workload, k: int = 10) -> dict:
    """Where hesse.eigs spends time besides its HVPs: the same HVPs alone, and copies.

    Returns the time per HVP inside ``eigs`` and outside it (same process, same vectors'
    size), and the self time and call count of ``aten::copy_`` in both.
    """
    from torch.profiler import profile

    op = hesse.HessianOperator(hesse.Objective(w.model, w.batches, loss=w.loss))
    v = torch.randn(w.n_params)
    op @ v
    with profile() as p_eigs:
        r, t_eigs = timed(hesse.eigs, op, k=k, which="largest", seed=0)
    n = r.n_matvecs
    with profile() as p_hvp:
        _, t_hvp = timed(lambda: [op @ v for _ in range(n)])

    def copies(p):
        e = next((e for e in p.key_averages() if e.key == "aten::copy_"), None)
        return (e.self_cpu_time_total / 1e6, e.count) if e else (0.0, 0)

    (c_eigs, n_eigs), (c_hvp, n_hvp) = copies(p_eigs), copies(p_hvp)
    return {
        "workload": w.name,
        "k": k,
        "hvps": n,
        "eigs_s": t_eigs,
        "hvps_alone_s": t_hvp,
        "per_hvp_in_eigs_s": t_eigs / n,
        "per_hvp_alone_s": t_hvp / n,
        "copy_s_in_eigs": c_eigs,
        "copy_calls_in_eigs": n_eigs,
        "copy_s_alone": c_hvp,
        "copy_calls_alone": n_hvp,
    }
