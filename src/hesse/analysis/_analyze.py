"""``analyze``: the curvature report of a model, its loss and its data."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from hesse.analysis._checkpoint import Checkpoint, ProductLog, RecordingOperator, TimeUp
from hesse.analysis._documents import density_dict, eig_dict, meta, no_ggn, trace_dict
from hesse.analysis.layers import blocks_by, empty_modules, layer_table, layer_table_cost
from hesse.analysis.outliers import find_outliers
from hesse.analysis.report import Report, parameters_line
from hesse.dynamics import criteria_from
from hesse.dynamics.verdicts import gd_verdict, omitted, sgd_verdict
from hesse.linalg import density, eigs, trace
from hesse.operators import FisherOperator, GGNOperator, HessianOperator
from hesse.operators.plan import MemoryPlan, plan
from hesse.problem.objective import Objective

SECTIONS = ("eigs", "trace", "density", "layers", "ggn")
CURVATURES = ("hessian", "ggn", "fisher")
QUIET = {"progress": False}
"""The algorithms' own bars stay off: the analysis shows one bar of products per section."""


@dataclass(frozen=True)
class Options:
    """What ``analyze`` computes and how much it may spend.

    Attributes:
        curvature: ``"hessian"``, ``"ggn"`` or ``"fisher"`` (Monte-Carlo "true" Fisher).
        sections: which of ``SECTIONS`` to compute (outliers and stability follow from them).
        k: number of largest eigenvalues.
        k_smallest: number of smallest (most negative) eigenvalues.
        budget: products per estimate: each eigenvalue run, the trace, the block traces.
        steps: Lanczos steps per probe of the spectral density.
        probes: probes of the spectral density.
        seed: seed of every random probe and start vector.
    """

    curvature: str = "hessian"
    sections: tuple[str, ...] = SECTIONS
    k: int = 20
    k_smallest: int = 5
    budget: int = 100
    steps: int = 80
    probes: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.curvature not in CURVATURES:
            raise ValueError(
                f"analyze: curvature={self.curvature!r} is not one of {', '.join(CURVATURES)}."
            )
        unknown = sorted(set(self.sections) - set(SECTIONS))
        if unknown:
            raise ValueError(f"analyze: unknown sections {unknown}; choose from {SECTIONS}.")
        counts = {
            "k": self.k,
            "k_smallest": self.k_smallest,
            "steps": self.steps,
            "probes": self.probes,
        }
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"analyze: {name} must be at least 1, got {value}.")

    def check(self, dim: int) -> None:
        """Check the eigenvalue counts against ``dim`` parameters, then the budget against them.

        Raises:
            ValueError: more eigenvalues than parameters, or a budget below ``2k`` products.
        """
        sizes = self._lanczos_sizes()
        if sizes and max(sizes) > dim:
            raise ValueError(
                f"analyze: k={max(sizes)} eigenvalues asked for, but only {dim} parameters are "
                f"analysed (a {dim}x{dim} curvature matrix); pass k <= {dim}."
            )
        need = max([4] + [2 * k for k in sizes])
        if self.budget < need:
            raise ValueError(
                f"analyze: budget={self.budget} products is too small for k={self.k}: Lanczos "
                f"needs about 2k products and the trace at least 4; pass budget >= {need}."
            )

    def _lanczos_sizes(self) -> list[int]:
        """Numbers of eigenvalues the chosen sections ask Lanczos for."""
        sizes = [self.k] if {"eigs", "ggn"} & set(self.sections) else []
        return sizes + ([self.k_smallest] if "eigs" in self.sections else [])


def analyze(
    model: nn.Module,
    data,
    loss: Callable | None = None,
    *,
    loss_fn: Callable | None = None,
    params=None,
    lr: float | None = None,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    layers_by: str | None = None,
    groups: dict | None = None,
    n_classes: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    max_memory: int | None = None,
    progress: bool = False,
    checkpoint: str | None = None,
    name: str | None = None,
    description: str | None = None,
    training: dict | None = None,
    **options,
) -> Report:
    """The curvature report of ``model`` on ``data``: spectrum, trace, density, layers, verdicts.

    One call computes, on the full data: the ``k`` largest and ``k_smallest`` smallest
    eigenvalues with residual bounds (Lanczos), the trace with a 95% CI (Hutch++), the
    spectral density (stochastic Lanczos quadrature), the GGN's top eigenvalues and trace
    beside the Hessian's, a per-module table (trace, trace per parameter, top eigenvalue),
    the bulk/outlier split against the number of classes, and, given the training learning
    rate, the GD and SGD stability verdicts. ``analyze(...)`` is
    ``prepare(Objective(...), ...).run(...)``: call those two to see the memory plan before
    any product is computed.

    Args:
        model: the network, in eval mode.
        data: a ``DataLoader``, a list of batches, or one batch (see ``hesse.Objective``).
        loss: ``loss(outputs, targets)``, e.g. ``F.cross_entropy``.
        loss_fn: instead of ``loss``: ``loss_fn(model, batch) -> (mean_loss, weight)``.
        params: the parameters to analyse, as ``Objective(params=)`` takes them (names,
            module prefixes, glob patterns such as ``"encoder.layer.5.*"``); default all
            trainable ones. The layer table and the report cover only these.
        lr: the training learning rate ``eta`` (stability verdicts need it).
        optimizer: how the model was trained: ``"sgd"``, ``"momentum"`` (heavy ball,
            threshold ``(2 + 2 momentum)/eta``) or ``"adam"`` (no verdict: Adam's threshold
            is about the preconditioned sharpness; the report says why).
        momentum: the heavy-ball momentum of ``optimizer="momentum"``.
        layers_by: rows of the layer table: ``"module"``, ``"block"`` (attention and MLP of
            each transformer layer) or ``"param"``; default ``"block"`` for transformers.
        groups: user groups for the layer table, ``{name: names, prefixes or globs}``
            (parameters in no group form a ``"(rest)"`` row).
        n_classes: number of classes ``C`` (inferred from 2-D outputs when None).
        dtype: compute dtype (e.g. ``torch.float64``); default the model's.
        device: compute device; default the model's.
        max_memory: bytes the run may hold; the density's probe groups and the blocks of
            probes are chosen to fit (see ``hesse.plan``), or the run is refused.
        progress: show tqdm bars of the products, with their totals.
        checkpoint: file to record products in, so that a killed run resumes exactly.
        name: a short name for the report (default: the model's class name).
        description: a paragraph about the model, for the report.
        training: how the model was trained, recorded in the report.
        **options: fields of :class:`Options` (``curvature``, ``sections``, ``k``,
            ``k_smallest``, ``budget``, ``steps``, ``probes``, ``seed``).

    Returns:
        Report.

    Raises:
        ValueError: invalid options, ``k`` larger than the number of parameters, a plan
            that does not fit ``max_memory``, a checkpoint of another run, or any
            ``Objective`` error.

    Example:
        >>> report = analyze(model, loader, F.cross_entropy, lr=0.1)  # doctest: +SKIP
        >>> print(report.summary())  # doctest: +SKIP
    """
    objective = Objective(
        model, data, loss, loss_fn=loss_fn, params=params, dtype=dtype, device=device
    )
    job = prepare(
        objective, selection=params, lr=lr, optimizer=optimizer, momentum=momentum,
        layers_by=layers_by, groups=groups, n_classes=n_classes, max_memory=max_memory,
        name=name, description=description, training=training, **options,
    )  # fmt: skip
    return job.run(progress=progress, checkpoint=checkpoint)


def prepare(
    objective: Objective,
    *,
    selection=None,
    lr: float | None = None,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    layers_by: str | None = None,
    groups: dict | None = None,
    n_classes: int | None = None,
    max_memory: int | None = None,
    name: str | None = None,
    description: str | None = None,
    training: dict | None = None,
    **options,
) -> Analysis:
    """Check an analysis of ``objective`` and plan its memory, without computing a product.

    Args:
        objective: the function of the analysed parameters.
        selection: how those parameters were chosen (``Objective(params=)``), for the report.
        lr, optimizer, momentum, layers_by, groups, n_classes, name, description, training,
            **options: as for :func:`analyze`.
        max_memory: bytes the run may hold (None: no limit, the plan is only reported).

    Returns:
        Analysis: ``.plan`` holds the memory plan, ``.run()`` computes the report.

    Raises:
        ValueError: invalid options, or ``k`` larger than the number of analysed parameters.
        hesse.MemoryPlanError: (a ``ValueError``) nothing fits ``max_memory``; the
            message quotes the smallest plan.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
        >>> ce = torch.nn.functional.cross_entropy
        >>> objective = Objective(model, data, loss=ce, params=["2.*"])
        >>> job = prepare(objective, selection=["2.*"], k=3, budget=12)
        >>> job.describe().split("; ")[0]
        'parameters analysed: 10 of 26 (selection: 2.*)'
        >>> job.plan.dim, job.plan.samples
        (10, 8)
        >>> report = job.run()
        >>> report.problem["n_params"], [row.name for row in report.layers]
        (10, ['2'])
    """
    if lr is not None and not lr > 0:
        raise ValueError(f"analyze: lr must be a positive learning rate, got {lr}.")
    momentum = momentum if optimizer == "momentum" else 0.0
    omitted(optimizer, momentum)  # checks both
    opts = Options(**{**options, "sections": tuple(options.get("sections", SECTIONS))})
    opts.check(objective.dim)
    memory = _plan(objective, opts, max_memory)
    about = {"name": name, "description": description, "training": training}
    about |= {"optimizer": optimizer, "momentum": momentum}
    about |= {"layers_by": layers_by or blocks_by(objective.space), "groups": groups}
    objective.space.blocks(about["layers_by"], groups)  # a bad grouping fails here, not later
    chosen = _selection(objective.model, selection)
    return Analysis(objective, opts, memory, max_memory, lr, n_classes, chosen, about)


class Analysis:
    """A checked analysis: the objective, its options and memory plan; ``run()`` computes it.

    Attributes:
        objective: the function of the analysed parameters.
        options: the checked :class:`Options`.
        plan: the ``hesse.MemoryPlan``: bytes per item, and the density's probe group,
            the block size and (under ``max_memory``) the graph cache that the run uses.
        max_memory: the cap the plan was fitted to (None: none).
        selection: the parameter selection as given (None: all trainable parameters).
        n_params_total: trainable parameters of the model (analysed or not).
    """

    def __init__(self, objective, options, plan, max_memory, lr, n_classes, selection, about):
        self.objective, self.options, self.plan = objective, options, plan
        self.max_memory, self.lr, self.n_classes = max_memory, lr, n_classes
        self.selection, self.about = selection, about
        model = objective.model
        self.n_params_total = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def describe(self) -> str:
        """One line: parameters analysed (of how many, chosen how), samples, memory plan."""
        line = parameters_line(self.objective.dim, self.n_params_total, self.selection)
        return f"{line}; {self.plan}"

    def max_products(self) -> int:
        """The most products the chosen sections may compute (Lanczos often needs fewer)."""
        by, groups = self.about["layers_by"], self.about["groups"]
        return sum(section_products(self.options, self.objective.space, by, groups).values())

    def operator_options(self) -> dict:
        """``block_size`` (and, under ``max_memory``, ``max_cache_bytes``) from the plan."""
        sizes = {"block_size": self.plan.block_size}
        if self.max_memory is None:
            return sizes  # the operators size their graph cache from the free memory
        return sizes | {"max_cache_bytes": self.plan.max_cache_bytes}

    def run(
        self,
        *,
        progress: bool = False,
        checkpoint: str | None = None,
        max_time: float | None = None,
        on_first: Callable[[float], None] | None = None,
    ) -> Report:
        """Compute the report.

        Args:
            progress, checkpoint: as for :func:`analyze`.
            max_time: seconds after which no new product starts. Eigenvalue runs get the
                products that fit the time left (at the rate measured so far) and report
                what they found with ``converged=False``; a section cut off, and those after
                it, are left out of the report, which lists them in ``partial`` (with a
                checkpoint, rerunning resumes them).
            on_first: called with the seconds of the first product.
        """
        o = self.objective
        problem = _problem(o, self.n_classes, self.plan.samples or None)
        problem |= {"model": self.about["name"] or problem["model"]}
        problem |= {k: self.about[k] for k in ("description", "training")}
        problem |= {"n_params_total": self.n_params_total}
        key = _checkpoint(checkpoint, self.options, self.lr, o, problem, self.selection)
        log = ProductLog(key, progress=progress, max_time=max_time, on_first=on_first)
        return _Run(self, log, problem).run()


class _Run:
    """The sections of one analysis, each timed, all products through one ``ProductLog``."""

    def __init__(self, job: Analysis, log: ProductLog, problem: dict):
        self.job, self.model, self.objective = job, job.objective.model, job.objective
        self.opts, self.log, self.lr, self.problem = job.options, log, job.lr, problem
        self.base = _operator(self.objective, self.opts, job.operator_options())
        self.op = RecordingOperator(self.base, log)
        self.timings: dict[str, float] = {}
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
        }
        steps = {name: (step, totals.get(name)) for name, step in steps.items()}
        todo = [name for name in steps if name in wanted]
        try:
            for name in todo:
                step, total = steps[name]
                found[name] = self.timed(name, total, step)
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
        top = eigs(self.op, o.k, which="largest", max_matvecs=budget, seed=o.seed, **QUIET)
        self.unconverged(f"{o.k} largest eigenvalues", top)
        largest = eig_dict(top)
        del top  # its (d, k) vectors: the next basis should not sit beside them
        budget = max(self.log.affordable(o.budget), o.k_smallest)
        low = eigs(self.op, o.k_smallest, which="smallest", max_matvecs=budget, seed=o.seed,
                   **QUIET)  # fmt: skip
        self.unconverged(f"{o.k_smallest} smallest eigenvalues", low)
        return {"largest": largest, "smallest": eig_dict(low)}

    def unconverged(self, what: str, result) -> None:
        """Note why an eigenvalue run did not converge (its bounds may still be tight)."""
        if not result.converged:
            self.notes.append(f"The {what} are NOT converged: {result.reason}.")

    def trace(self) -> dict:
        return trace_dict(trace(self.op, self.opts.budget, seed=self.opts.seed, **QUIET))

    def density(self) -> dict:
        o = self.opts
        # under max_memory the plan's group; otherwise density's own default (1 GiB of bases)
        group = self.job.plan.group if self.job.max_memory is not None else None
        result = density(self.op, o.steps, o.probes, seed=o.seed, group=group, **QUIET)
        self.density_result = result
        return density_dict(result, o.steps, o.probes)

    def layers(self) -> tuple:
        self.base.clear_cache()  # the blocks keep graphs of their own
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
        if o.curvature != "hessian":
            return no_ggn(f"the analysed curvature is already {o.curvature}")
        self.base.clear_cache()  # room for the GGN's graphs
        try:
            G = RecordingOperator(
                GGNOperator(self.objective, **self.job.operator_options()), self.log
            )
        except ValueError as err:
            return no_ggn(str(err))
        top = eigs(G, o.k, which="largest", max_matvecs=o.budget, seed=o.seed, **QUIET)
        self.unconverged(f"GGN's {o.k} largest eigenvalues", top)
        return {"available": True, "reason": None, "eigs": eig_dict(top),
                "trace": trace_dict(trace(G, o.budget, seed=o.seed, **QUIET))}  # fmt: skip

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
                "No SGD trace verdict: the criterion Tr(H) <= 2/η is derived for SGD without "
                "momentum."
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
    }
    return {name: n for name, n in most.items() if name in opts.sections}


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


def _plan(objective: Objective, opts: Options, max_memory: int | None) -> MemoryPlan:
    """The memory plan of the chosen sections (one Lanczos basis, the density's probes)."""
    slq = "density" in opts.sections
    return plan(
        objective, k=max(opts._lanczos_sizes(), default=1), steps=opts.steps if slq else 1,
        probes=opts.probes if slq else 1, max_memory=max_memory, curvature=opts.curvature,
    )  # fmt: skip


def _selection(model: nn.Module, selection) -> list[str] | None:
    """The parameter selection as strings: names as given, objects by their name in ``model``."""
    if selection is None:
        return None
    single = isinstance(selection, (str, nn.Module, torch.Tensor))
    items = [selection] if single else list(selection)
    names = {id(m): n or "(root)" for n, m in model.named_modules()}
    names |= {id(t): n for n, t in model.named_parameters()}
    return [x if isinstance(x, str) else names.get(id(x), type(x).__name__) for x in items]


def _operator(objective: Objective, opts: Options, sizes: dict):
    if opts.curvature == "ggn":
        return GGNOperator(objective, **sizes)
    if opts.curvature == "fisher":
        return FisherOperator(objective, "mc", seed=opts.seed, **sizes)
    return HessianOperator(objective, **sizes)


def _problem(objective: Objective, n_classes, n_samples) -> dict:
    name = _loss_name(objective)
    value = float(objective.value())
    return {
        "model": type(objective.model).__name__,
        "n_params": objective.dim,
        "n_samples": n_samples,
        "loss": value,
        "loss_name": name,
        "loss_source": objective.loss_source,
        "gradient_norm": float(objective.gradient().norm()),
        "n_classes": n_classes if n_classes is not None else _infer_classes(objective, name),
    }


def _loss_name(objective: Objective) -> str:
    """The recognised loss (also a Hugging Face model's own, inferred), else "custom"."""
    if objective.loss_fn is not None:
        return "custom loss_fn"
    return objective.loss_spec.kind if objective.loss_spec is not None else "custom"


def _infer_classes(objective: Objective, loss_name: str) -> int | None:
    """Output width of the first batch, for classification losses with ``(N, C)`` outputs.

    Token-level losses of language models and token classifiers have rows per token, not per
    sample, and ``C`` is a vocabulary: the ``C - 1`` outlier count is about sample classes.
    """
    if loss_name not in ("cross_entropy", "mse", "nll") or objective.task not in (
        None,
        "sequence-classification",
    ):
        return None
    with torch.no_grad():
        outputs = objective.outputs(objective.params, next(objective.batches()))
    return outputs.shape[1] if outputs.dim() == 2 else None


def _checkpoint(path, opts: Options, lr, objective: Objective, problem: dict, selection):
    if path is None:
        return None
    weights = torch.cat([p.detach().reshape(-1).cpu() for p in objective.params.values()])
    key = {
        "options": asdict(opts) | {"sections": list(opts.sections)},
        "lr": lr,
        "dtype": str(objective.dtype),
        "dim": objective.dim,
        "weights_sha256": hashlib.sha256(weights.numpy().tobytes()).hexdigest(),
        "loss": float(problem["loss"]).hex(),
    }
    if selection is not None:  # a subset of parameters: its names are part of the run
        key["params"] = list(objective.params)
    return Checkpoint(path, key)
