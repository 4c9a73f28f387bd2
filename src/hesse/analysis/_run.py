"""One run of an analysis: the sections in order, each timed, checkpointed and reported."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, cast

from ..dynamics import criteria_from
from ..dynamics.sgd_verdicts import sgd_verdict
from ..dynamics.verdicts import gd_verdict, omitted
from ..linalg import curvature_gap, density, eigs, trace
from ..operators import (
    EKFACOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    KFACOperator,
    ModelOperator,
    Operator,
    kronecker_operator,
)
from ..problem.objective import Objective
from ._checkpoint import ProductLog, RecordingOperator, TimeUp
from ._documents import density_dict, eig_dict, factor_trace, gap_dict, meta, no_ggn, trace_dict
from .layers import empty_modules, layer_table, layer_table_cost
from .options import KRONECKER, Options
from .outliers import find_outliers
from .report import Report

if TYPE_CHECKING:
    from ._analyze import Analysis

QUIET: dict[str, Any] = {"progress": False}
"""The algorithms' own bars stay off: the analysis shows one bar of products per section."""


class Run:
    """The sections of one analysis, each timed, all products through one ``ProductLog``."""

    def __init__(self, job: Analysis, log: ProductLog, problem: dict):
        self.job, self.model, self.objective = job, job.objective.model, job.objective
        self.opts, self.log, self.lr, self.problem = job.options, log, job.lr, problem
        start = time.perf_counter()
        self.base = _operator(self.objective, self.opts, job.operator_options())
        self.timings: dict[str, float] = {}
        if self.opts.curvature in KRONECKER:  # one data pass (two for EKFAC) for the factors
            self.timings["factors"] = round(time.perf_counter() - start, 3)
        self.op = RecordingOperator(self.base, log)
        self.notes: list[str] = []
        self.by, self.groups = job.about["layers_by"], job.about["groups"]

    def run(self) -> Report:
        """Compute every requested section, then the outliers and the verdicts."""
        wanted, o = self.opts.sections, self.opts
        found = {}
        totals = section_products(o, self.op.space, self.by, self.groups)
        steps = {
            "eigs": self.eigs,
            "trace": self.trace,
            "density": self.density,
            "layers": self.layers,
            "ggn": self.ggn,
            "kfac": self.kfac,
        }
        todo = [name for name in steps if name in wanted and _applies(name, o.curvature)]
        try:
            for name in todo:
                found[name] = self.timed(name, totals.get(name), steps[name])
        except TimeUp:
            self.notes.append(_partial_note(todo[len(found) :], self.log))
        self.log.close()
        plan = {"summary": str(self.job.plan)} | self.job.plan.to_dict()
        partial = tuple(name for name in todo if name not in found)
        return Report(
            meta=meta(), config=self.config(), problem=self.problem, **found,
            outliers=self.outliers(found), stability=self.stability(found),
            criteria=self.criteria(found), notes=tuple(self.notes), timings=self.timings,
            plan=plan, partial=partial,
            layers_by="groups" if self.groups else self.by,
        )  # fmt: skip

    def timed(self, name: str, total: int | None, step: Callable):
        """Run ``step`` under a progress bar of ``total`` products and record its seconds."""
        self.log.step(name, total)
        start = time.perf_counter()
        result = step()
        self.timings[name] = round(time.perf_counter() - start, 3)
        return result

    def config(self) -> dict:
        """The ``config`` section: the options, the learning rate, dtype, device, selection."""
        c = asdict(self.opts) | {"sections": list(self.opts.sections), "lr": self.lr}
        c |= {k: self.job.about[k] for k in ("optimizer", "momentum")}
        o = self.objective
        c |= {"dtype": str(o.dtype).removeprefix("torch."), "device": str(o.device)}
        return c | {"params": self.job.selection}

    def eigs(self) -> dict:
        o = self.opts
        # under a time budget each run gets the products that fit the time left, so that it
        # stops with what it found (converged=False) instead of being cut off
        budget = max(self.log.affordable(o.budget), o.k)
        quiet = QUIET | self.basis()
        top = eigs(self.op, o.k, which="largest", max_matvecs=budget, seed=o.seed, **quiet)
        self.unconverged(f"{o.k} largest eigenvalues", top)
        largest = eig_dict(top)
        del top  # its (d, k) vectors: the next basis should not sit beside them
        budget = max(self.log.affordable(o.budget), o.k_smallest)
        low = eigs(self.op, o.k_smallest, which="smallest", max_matvecs=budget, seed=o.seed,
                   **quiet)  # fmt: skip
        self.unconverged(f"{o.k_smallest} smallest eigenvalues", low)
        return {"largest": largest, "smallest": eig_dict(low)}

    def basis(self) -> dict:
        """The basis dtype the plan chose to fit ``max_memory`` (none: eigs chooses)."""
        return {} if self.job.max_memory is None else {"basis_dtype": self.job.plan.basis_dtype}

    def unconverged(self, what: str, result) -> None:
        """Note why an eigenvalue run did not converge (its bounds may still be tight)."""
        if not result.converged:
            self.notes.append(f"The {what} are NOT converged: {result.reason}.")

    def trace(self) -> dict:
        if self.opts.curvature in KRONECKER:
            return factor_trace(_kronecker(self.base).trace())
        return trace_dict(trace(self.op, self.opts.budget, seed=self.opts.seed, **QUIET))

    def density(self) -> dict:
        o = self.opts
        # under max_memory the plan's group; otherwise density's own default (1 GiB of bases)
        group = self.job.plan.group if self.job.max_memory is not None else None
        result = density(self.op, o.steps, o.probes, seed=o.seed, group=group, **QUIET)
        self.density_result = result
        return density_dict(result, o.steps, o.probes)

    def layers(self) -> tuple:
        _clear_cache(self.base)  # the blocks keep graphs of their own
        empty = empty_modules(self.op.space, self.by, self.groups)
        if empty:
            self.notes.append(
                f"Layer table: no row for {', '.join(empty)}: zero-size parameters, no curvature."
            )
        return layer_table(self.op, self.model, budget=self.opts.budget, seed=self.opts.seed,
                           block_size=self.job.plan.block_size, by=self.by,
                           groups=self.groups)  # fmt: skip

    def ggn(self) -> dict:
        o = self.opts
        if o.curvature in KRONECKER:
            return no_ggn(f"the analysed curvature is {o.curvature}; the kfac section compares "
                          "it with the GGN")  # fmt: skip
        if o.curvature != "hessian":
            return no_ggn(f"the analysed curvature is already {o.curvature}")
        _clear_cache(self.base)  # room for the GGN's graphs
        try:
            G = RecordingOperator(
                GGNOperator(self.objective, **self.job.operator_options()), self.log
            )
        except ValueError as err:
            return no_ggn(str(err))
        top = eigs(
            G, o.k, which="largest", max_matvecs=o.budget, seed=o.seed, **QUIET, **self.basis()
        )
        self.unconverged(f"GGN's {o.k} largest eigenvalues", top)
        return {"available": True, "reason": None, "eigs": eig_dict(top),
                "trace": trace_dict(trace(G, o.budget, seed=o.seed, **QUIET))}  # fmt: skip

    def kfac(self) -> dict:
        """The Kronecker curvature against the exact GGN (``curvature_gap``), same budget."""
        o, K = self.opts, _kronecker(self.base)
        G = RecordingOperator(GGNOperator(self.objective, **self.job.operator_options()),
                              self.log)  # fmt: skip
        gap = curvature_gap(G, K, o.k, by=self.by, groups=self.groups, budget=o.budget,
                            seed=o.seed, max_matvecs=o.budget, **QUIET)  # fmt: skip
        if not gap.converged:
            self.notes.append(f"The kfac section's eigenvalues are NOT converged: {gap.reason}.")
        traces = {name: _kronecker(b).trace() for name, b in K.blocks(self.by, self.groups).items()}
        return gap_dict(gap, K, traces, "groups" if self.groups else self.by)

    def criteria(self, found: dict) -> dict | None:
        """LLA's spectral criteria from the eigenvalues and the density (no extra product)."""
        if not {"eigs", "density"} <= found.keys():
            return None
        values = found["eigs"]["largest"]["values"]
        if len(values) < 2 or not values[-1] > 0:
            return None
        found = criteria_from(values, self.density_result).as_dict()
        return found | {"eigenvalues": list(found["eigenvalues"])}

    def outliers(self, found: dict):
        if "eigs" not in found:
            return None
        p = self.problem
        values = found["eigs"]["largest"]["values"]
        return find_outliers(values, n_classes=p["n_classes"], loss_name=p["loss_name"],
                             loss=p["loss"])  # fmt: skip

    def stability(self, found: dict):
        if self.lr is None or not {"eigs", "trace"} & found.keys():
            return None
        if self.opts.curvature != "hessian":
            self.notes.append("Stability verdicts are about the Hessian; rerun with it.")
            return None
        optimizer, momentum = self.job.about["optimizer"], self.job.about["momentum"]
        why = omitted(optimizer, momentum)
        if why is not None:
            self.notes.append(why)
            return None
        verdicts = []
        if "eigs" in found:
            top = found["eigs"]["largest"]
            gd = gd_verdict(top["values"][0], top["residuals"][0], self.lr,
                            converged=top["converged"], momentum=momentum)  # fmt: skip
            if self.job.selection is None or gd.status == "unstable":
                verdicts.append(gd)
            else:
                self.notes.append(SUBSET_GD)
        if "trace" in found and self.job.selection is not None:
            self.notes.append(SUBSET_TRACE)
        elif "trace" in found and momentum > 0:
            self.notes.append(
                "No SGD verdict: the linear-stability criterion at a batch size is derived for "
                "SGD without momentum."
            )
        elif "trace" in found:
            t = found["trace"]
            verdicts.append(
                sgd_verdict(t["value"], tuple(t["ci95"]), self.lr, self.problem["loss"])
            )
        return tuple(verdicts)


SUBSET_GD = (
    "No GD verdict: λmax of the selected parameters' block is only a lower bound of the "
    "model's λmax (eigenvalue interlacing), so it can show instability but not stability; "
    "analyse all parameters for a verdict."
)
SUBSET_TRACE = (
    "No SGD trace verdict: the criterion bounds the trace of the whole Hessian, and the trace "
    "of the selected parameters' block is only part of it."
)


def section_products(
    opts: Options, space, by: str = "module", groups: dict | None = None
) -> dict[str, int]:
    """The most products each requested section may compute (its progress bar's total)."""
    most = {
        "eigs": 2 * opts.budget,
        "trace": opts.budget,
        "density": opts.steps * opts.probes,
        "layers": layer_table_cost(space, opts.budget, by, groups),
        "ggn": 2 * opts.budget,
        # the GGN's products: Lanczos, then tr(G - K), ||G - K||_F, ||G||_F, whole and per block
        "kfac": opts.budget * (1 + 3 * (1 + len(space.blocks(by, groups)))),
    }
    wanted = [name for name in opts.sections if _applies(name, opts.curvature)]
    return {name: n for name, n in most.items() if name in wanted}


def _applies(section: str, curvature: str) -> bool:
    """Whether ``section`` is computed for ``curvature`` (``kfac`` only for Kronecker ones)."""
    return section != "kfac" or curvature in KRONECKER


def _partial_note(missing: list[str], log: ProductLog) -> str:
    """What a run stopped by its time budget left out, and how to finish it."""
    resume = (
        "rerun the same command to resume from the checkpoint"
        if log.checkpoint is not None
        else "rerun with a checkpoint (and a larger time budget) to finish them"
    )
    return (
        f"Stopped by the time budget after {log.computed} products: not computed: "
        f"{', '.join(missing)} (the first was under way); {resume}."
    )


def _operator(objective: Objective, opts: Options, sizes: dict) -> Operator:
    if opts.curvature in ("kfac", "ekfac"):
        return kronecker_operator(objective, opts.curvature)
    if opts.curvature == "ggn":
        return GGNOperator(objective, **sizes)
    if opts.curvature == "fisher":
        return FisherOperator(objective, "mc", seed=opts.seed, **sizes)
    return HessianOperator(objective, **sizes)


def _kronecker(op: Operator) -> KFACOperator | EKFACOperator:
    """A Kronecker operator (or one of its blocks, of the same class) as its type."""
    return cast("KFACOperator | EKFACOperator", op)


def _clear_cache(op: Operator) -> None:
    """Free the graphs a model operator keeps (a Kronecker operator keeps none)."""
    if isinstance(op, ModelOperator):
        op.clear_cache()
