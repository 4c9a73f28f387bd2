"""``analyze``: the curvature report of a model, its loss and its data."""

from __future__ import annotations

import hashlib
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib.metadata import version

import numpy as np
import torch
from torch import nn

from hesse._checkpoint import Checkpoint, ProductLog, RecordingOperator
from hesse.analysis.layers import layer_table
from hesse.analysis.outliers import find_outliers
from hesse.analysis.report import Report
from hesse.analysis.stability import gd_verdict, sgd_verdict
from hesse.linalg import density, eigs, trace
from hesse.objective import Objective, loss_kind
from hesse.operators import FisherOperator, GGNOperator, HessianOperator

SECTIONS = ("eigs", "trace", "density", "layers", "ggn")
CURVATURES = ("hessian", "ggn", "fisher")


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
        need = max([4] + [2 * k for k in self._lanczos_sizes()])
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
    lr: float | None = None,
    n_classes: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
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
    rate, the GD and SGD stability verdicts.

    Args:
        model: the network, in eval mode.
        data: a ``DataLoader``, a list of batches, or one batch (see ``hesse.Objective``).
        loss: ``loss(outputs, targets)``, e.g. ``F.cross_entropy``.
        loss_fn: instead of ``loss``: ``loss_fn(model, batch) -> (mean_loss, weight)``.
        lr: the training learning rate ``eta`` (stability verdicts need it).
        n_classes: number of classes ``C`` (inferred from 2-D outputs when None).
        dtype: compute dtype (e.g. ``torch.float64``); default the model's.
        device: compute device; default the model's.
        progress: show tqdm bars of the data passes.
        checkpoint: file to record products in, so that a killed run resumes exactly.
        name: a short name for the report (default: the model's class name).
        description: a paragraph about the model, for the report.
        training: how the model was trained, recorded in the report.
        **options: fields of :class:`Options` (``curvature``, ``sections``, ``k``,
            ``k_smallest``, ``budget``, ``steps``, ``probes``, ``seed``).

    Returns:
        Report.

    Raises:
        ValueError: invalid options, ``k`` larger than the number of parameters, a
            checkpoint of another run, or any ``Objective`` error.

    Example:
        >>> report = analyze(model, loader, F.cross_entropy, lr=0.1)  # doctest: +SKIP
        >>> print(report.summary())  # doctest: +SKIP
    """
    opts = Options(**{**options, "sections": tuple(options.get("sections", SECTIONS))})
    if lr is not None and not lr > 0:
        raise ValueError(f"analyze: lr must be a positive learning rate, got {lr}.")
    objective = Objective(model, data, loss, loss_fn=loss_fn, dtype=dtype, device=device)
    if max(opts.k, opts.k_smallest) > objective.dim:
        raise ValueError(
            f"analyze: k={max(opts.k, opts.k_smallest)} eigenvalues asked for, but the model "
            f"has only {objective.dim} parameters; pass k <= {objective.dim}."
        )
    problem = _problem(model, objective, loss, loss_fn, n_classes)
    problem |= {"model": name or problem["model"], "description": description, "training": training}
    log = ProductLog(_checkpoint(checkpoint, opts, lr, objective, problem), progress=progress)
    return _Analysis(model, objective, opts, log, lr, problem).run()


class _Analysis:
    """The sections of one analysis, each timed, all products through one ``ProductLog``."""

    def __init__(self, model, objective, opts: Options, log: ProductLog, lr, problem: dict):
        self.model, self.objective, self.opts, self.log = model, objective, opts, log
        self.lr, self.problem = lr, problem
        self.op = RecordingOperator(_operator(objective, opts), log)
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []

    def run(self) -> Report:
        """Compute every requested section, then the outliers and the verdicts."""
        wanted, o = self.opts.sections, self.opts
        found = {}
        steps = {
            "eigs": (self.eigs, 2 * o.budget),
            "trace": (self.trace, o.budget),
            "density": (self.density, o.steps * o.probes),
            "layers": (self.layers, None),
            "ggn": (self.ggn, 2 * o.budget),
        }
        for name, (step, total) in steps.items():
            if name in wanted:
                found[name] = self.timed(name, total, step)
        self.log.close()
        return Report(
            meta=_meta(), config=self.config(), problem=self.problem, **found,
            outliers=self.outliers(found), stability=self.stability(found),
            notes=tuple(self.notes), timings=self.timings,
        )  # fmt: skip

    def timed(self, name: str, total: int | None, step: Callable):
        """Run ``step`` under a progress bar of ``total`` products and record its seconds."""
        self.log.step(name, total)
        start = time.perf_counter()
        result = step()
        self.timings[name] = round(time.perf_counter() - start, 3)
        return result

    def config(self) -> dict:
        """The ``config`` section: the options, the learning rate, dtype and device."""
        c = asdict(self.opts) | {"sections": list(self.opts.sections), "lr": self.lr}
        o = self.objective
        return c | {"dtype": str(o.dtype).removeprefix("torch."), "device": str(o.device)}

    def eigs(self) -> dict:
        o = self.opts
        top = eigs(self.op, o.k, which="largest", max_matvecs=o.budget, seed=o.seed)
        low = eigs(self.op, o.k_smallest, which="smallest", max_matvecs=o.budget, seed=o.seed)
        return {"largest": _eig_dict(top), "smallest": _eig_dict(low)}

    def trace(self) -> dict:
        return _trace_dict(trace(self.op, self.opts.budget, seed=self.opts.seed))

    def density(self) -> dict:
        o = self.opts
        return _density_dict(density(self.op, o.steps, o.probes, seed=o.seed), o.steps, o.probes)

    def layers(self) -> tuple:
        return layer_table(self.op, self.model, budget=self.opts.budget, seed=self.opts.seed)

    def ggn(self) -> dict:
        o = self.opts
        if o.curvature != "hessian":
            return _no_ggn(f"the analysed curvature is already {o.curvature}")
        try:
            G = RecordingOperator(GGNOperator(self.objective), self.log)
        except ValueError as err:
            return _no_ggn(str(err))
        top = eigs(G, o.k, which="largest", max_matvecs=o.budget, seed=o.seed)
        return {"available": True, "reason": None, "eigs": _eig_dict(top),
                "trace": _trace_dict(trace(G, o.budget, seed=o.seed))}  # fmt: skip

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
        verdicts = []
        if "eigs" in found:
            top = found["eigs"]["largest"]
            verdicts.append(gd_verdict(top["values"][0], top["residuals"][0], self.lr))
        if "trace" in found:
            t = found["trace"]
            verdicts.append(
                sgd_verdict(t["value"], tuple(t["ci95"]), self.lr, self.problem["loss"])
            )
        return tuple(verdicts)


def _operator(objective: Objective, opts: Options):
    if opts.curvature == "ggn":
        return GGNOperator(objective)
    if opts.curvature == "fisher":
        return FisherOperator(objective, "mc", seed=opts.seed)
    return HessianOperator(objective)


def _eig_dict(result) -> dict:
    return {
        "which": result.which,
        "values": result.values.tolist(),
        "residuals": result.residuals.tolist(),
        "converged": bool(result.converged),
        "n_matvecs": int(result.n_matvecs),
    }


def _trace_dict(result) -> dict:
    return {
        "value": float(result.value),
        "stderr": float(result.stderr),
        "ci95": [float(x) for x in result.ci95],
        "method": result.method,
        "converged": bool(result.converged),
        "n_matvecs": int(result.n_matvecs),
    }


def _density_dict(result, steps: int, probes: int) -> dict:
    lo, hi = result.support
    width = hi - lo if hi > lo else 1.0
    grid = torch.linspace(lo - 0.05 * width, hi + 0.05 * width, 400, dtype=torch.float64)
    sigma = 0.01 * width
    return {
        "steps": steps,
        "probes": probes,
        "nodes": result.nodes.tolist(),
        "weights": result.weights.tolist(),
        "grid": grid.tolist(),
        "values": result(grid, sigma).tolist(),
        "sigma": sigma,
        "support": [lo, hi],
        "n_matvecs": int(result.n_matvecs),
    }


def _no_ggn(reason: str) -> dict:
    return {"available": False, "reason": reason, "eigs": None, "trace": None}


def _problem(model, objective: Objective, loss, loss_fn, n_classes) -> dict:
    name = _loss_name(loss, loss_fn)
    value = float(objective.value())
    return {
        "model": type(model).__name__,
        "n_params": objective.dim,
        "n_samples": _count_samples(objective),
        "loss": value,
        "loss_name": name,
        "gradient_norm": float(objective.gradient().norm()),
        "n_classes": n_classes if n_classes is not None else _infer_classes(objective, name),
    }


def _loss_name(loss, loss_fn) -> str:
    if loss_fn is not None:
        return "custom loss_fn"
    return loss_kind(loss) or "custom"


def _count_samples(objective: Objective) -> int | None:
    total = 0
    for batch in objective.batches():
        if isinstance(batch, Mapping):
            batch = list(batch.values())
        if not isinstance(batch, (list, tuple)) or not isinstance(batch[0], torch.Tensor):
            return None
        total += len(batch[0])
    return total


def _infer_classes(objective: Objective, loss_name: str) -> int | None:
    """Output width of the first batch, for classification losses with ``(N, C)`` outputs."""
    if loss_name not in ("cross_entropy", "mse", "nll"):
        return None
    with torch.no_grad():
        outputs = objective.outputs(objective.params, next(objective.batches()))
    return outputs.shape[1] if outputs.dim() == 2 else None


def _checkpoint(path, opts: Options, lr, objective: Objective, problem: dict):
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
    return Checkpoint(path, key)


def _meta() -> dict:
    return {
        "hesse": version("hesse"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": None,
    }
