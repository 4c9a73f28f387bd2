"""``analyze``: the curvature report of a model, its loss and its data."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from hesse.analysis._checkpoint import Checkpoint, ProductLog
from hesse.analysis.layers import blocks_by
from hesse.analysis.report import Report, parameters_line
from hesse.dynamics.verdicts import omitted
from hesse.operators.plan import MemoryPlan, plan
from hesse.problem.objective import Objective

from ._run import Run, section_products
from .options import SECTIONS, Options


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
    rate, the GD and SGD stability verdicts. With ``curvature="kfac"`` or ``"ekfac"`` the
    sections describe the Kronecker-factored GGN (its trace from the factors), and a ``kfac``
    section measures it against the exact GGN (``hesse.curvature_gap``). ``analyze(...)`` is
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
    about: dict[str, Any] = {"name": name, "description": description, "training": training}
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
        return Run(self, log, problem).run()


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
