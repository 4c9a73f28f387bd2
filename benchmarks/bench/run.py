"""The whole suite: which study runs on which workload, and with what budgets."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import tasks
from bench.adapters.curvlinops_adapter import CurvlinopsAdapter
from bench.adapters.eigenthings_adapter import EigenthingsAdapter
from bench.adapters.hesse_adapter import HesseAdapter
from bench.adapters.pyhessian_adapter import PyHessianAdapter
from bench.measure import timed
from bench.memory import NO_GRAPHS, measure
from bench.reference import reference
from bench.workloads import WORKLOADS

ADAPTERS = {
    a.name: a for a in (HesseAdapter, PyHessianAdapter, EigenthingsAdapter, CurvlinopsAdapter)
}


@dataclass(frozen=True)
class Config:
    """Sizes of the studies; ``quick()`` is the smoke run.

    Attributes:
        workloads: which workloads run.
        reps: repetitions of the HVP and gradient timings (median).
        ladder: workloads whose eigensolvers are also run at matched accuracy.
        pyhessian_top10: workloads where PyHessian's top-10 power iteration runs (it spends
            hundreds of HVPs; elsewhere only its top-1 runs).
        trace_workloads / trace_budgets / trace_seeds: the trace study on real operators.
        coverage_seeds: seeds of the dense-matrix coverage study.
        density_workloads: SLQ study (exact spectra needed).
        density_peers: workloads where all peers' SLQ runs (else PyHessian's only).
        layer_workloads / layer_peers / layer_reps: per-layer traces (hesse everywhere, peers
            on these), timed as the best of ``layer_reps`` runs.
        memory_workloads: peak memory of top-10, one fresh process per tool.
    """

    workloads: tuple[str, ...] = ("mlp", "cnn", "wide_mlp", "transformer")
    reps: int = 7
    ladder: tuple[str, ...] = ("mlp", "cnn", "wide_mlp", "transformer")
    pyhessian_top10: tuple[str, ...] = ("mlp", "cnn")
    trace_workloads: tuple[str, ...] = ("mlp",)
    trace_budgets: tuple[int, ...] = (10, 30, 100)
    trace_seeds: int = 10
    coverage_seeds: int = 300
    density_workloads: tuple[str, ...] = ("mlp", "cnn")
    density_peers: tuple[str, ...] = ("mlp",)
    layer_workloads: tuple[str, ...] = ("mlp", "cnn")
    layer_peers: tuple[str, ...] = ("mlp",)
    layer_reps: int = 3
    memory_workloads: tuple[str, ...] = ("wide_mlp", "transformer")

    @classmethod
    def quick(cls) -> Config:
        return cls(
            workloads=("mlp", "cnn"),
            reps=2,
            ladder=("mlp",),
            pyhessian_top10=("mlp",),
            trace_budgets=(10, 30),
            trace_seeds=3,
            coverage_seeds=40,
            density_workloads=("mlp",),
            layer_workloads=("mlp",),
            memory_workloads=("mlp",),
        )


def run(cfg: Config, threads: int, cache: Path, log=print) -> dict:
    """Run every study of ``cfg``; returns the results as plain data (the JSON file)."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    out: dict = {
        "workloads": {},
        "coverage": [],
        "memory": [],
        "profile": {},
        "eigs_overhead": None,
    }
    for name in cfg.workloads:
        w, secs = timed(WORKLOADS[name])
        log(f"[{name}] {w.n_params} parameters, built in {secs:.1f}s")
        ref = reference(w, cache)
        log(f"[{name}] reference: {ref.how} ({ref.seconds:.1f}s)")
        res = out["workloads"][name] = {
            "description": w.description,
            "params": w.n_params,
            "samples": w.n_samples,
            "batches": [len(x) for x, _ in w.batches],
            "reference": ref.how,
            "reference_seconds": ref.seconds,
            "reference_top10": ref.top.tolist(),
        }
        adapters = [cls(w) for cls in ADAPTERS.values()]
        res["hvp_check"] = tasks.hvp_check(w, adapters)
        res["hvp_cost"] = tasks.hvp_cost(w, adapters, cfg.reps)
        res["hesse_cold_hvp"] = tasks.cold_hvp(w)
        log(f"[{name}] HVP checked and timed")
        res["eigen"] = []
        for a in adapters:
            for k in (1, 10):
                if a.name == "PyHessian" and k == 10 and name not in cfg.pyhessian_top10:
                    continue
                ladder = name in cfg.ladder and not (a.name == "PyHessian" and name != "mlp")
                res["eigen"] += tasks.eigen(w, a, ref, k, ladder)
            log(f"[{name}] eigenvalues: {a.name} done")
        if name in cfg.trace_workloads:
            res["trace"] = tasks.trace_runs(w, adapters, ref, cfg.trace_budgets, cfg.trace_seeds)
            log(f"[{name}] trace study done")
        if ref.H is not None:
            out["coverage"] += tasks.trace_coverage(w, ref, cfg.trace_budgets, cfg.coverage_seeds)
        if name in cfg.density_workloads:
            chosen = adapters if name in cfg.density_peers else adapters[:2]
            res["density"] = tasks.density(w, chosen, ref)
            log(f"[{name}] density done")
        if name in cfg.layer_workloads:
            chosen = adapters if name in cfg.layer_peers else adapters[:1]
            res["layers"] = tasks.layers(w, chosen, ref, 100, cfg.layer_reps)
            log(f"[{name}] per-layer traces done")
        if name == "cnn":
            out["profile"] = tasks.profile_hvp(w)
        if name == "wide_mlp":
            out["eigs_overhead"] = tasks.eigs_overhead(w)
        if name in cfg.memory_workloads:
            for tool in ADAPTERS:
                row = tasks.matched(res["eigen"], tool, 10)
                settings = [
                    r["setting"] for r in res["eigen"] if r["tool"] == tool and r["k"] == 10
                ]
                index = settings.index(row["setting"]) if row else 0
                out["memory"].append(measure(tool, name, index, threads))
            out["memory"].append(measure("hesse" + NO_GRAPHS, name, 0, threads))
            log(f"[{name}] memory done")
    return out
