"""``hesse prune``: measured loss and accuracy against sparsity for each pruning method."""

from __future__ import annotations

import argparse
import time
from typing import Any, cast

import torch

from ..problem._evaluate import Evaluation, evaluate
from ..problem.objective import Objective
from ..prune import GROUP_METHODS, WEIGHT_METHODS, PrunePlan, prune
from ..report.page import Page, Section, png
from ._inputs import UsageError, parse_params

SUMMARY = "Second-order pruning (OBD, OBS, M-FAC, layer-wise OBS, heads, neurons), measured."
EXAMPLES = """examples:
  hesse prune --demo digits --sparsity 0.5,0.7,0.9 --method magnitude,mfac,layer_obs
  hesse prune --demo digits --method obd,obs --curvature fisher --damping 0.01
  hesse prune --demo digits --structure 2:4 --method magnitude,mfac --recompute 4
  hesse prune --demo tiny-lm --structure heads --method nvit,magnitude,random --sparsity 0.5
  hesse prune --model mymodels:make_net --data mymodels:make_data --test-data mymodels:make_test \\
              --method obs --curvature ggn --damping 0.1 --out pruned
"""
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_METHODS = {"weights": "magnitude,mfac,layer_obs", "units": "nvit,magnitude,random"}


def add_arguments(group: Any) -> None:
    """The options of ``hesse prune``."""
    group.add_argument("--sparsity", default="0.5,0.7,0.9",
                       help="fractions to prune, comma-separated (default 0.5,0.7,0.9); of the "
                       "heads or neurons for --structure heads|channels")  # fmt: skip
    group.add_argument("--method", help="comma-separated: " + ", ".join(WEIGHT_METHODS) +
                       " (weights; default magnitude,mfac,layer_obs) or " +
                       ", ".join(GROUP_METHODS) + " (heads, channels)")  # fmt: skip
    group.add_argument(
        "--structure",
        default="unstructured",
        help="unstructured, n:m (e.g. 2:4), heads or channels (MLP neurons)",
    )
    group.add_argument("--scope", choices=["global", "layer"], help="one ranking over all "
                       "layers (default) or the same sparsity per layer")  # fmt: skip
    group.add_argument(
        "--recompute",
        type=int,
        default=1,
        help="gradual steps, the curvature recomputed between them (default 1)",
    )
    group.add_argument(
        "--damping",
        type=float,
        default=1e-2,
        help="damping relative to the mean curvature diagonal (default 0.01)",
    )
    group.add_argument(
        "--gradients",
        type=int,
        metavar="M",
        help="gradients of the empirical Fisher (default min(256, samples))",
    )


def run(args: argparse.Namespace, problem: Any) -> Page:
    """Prune at each sparsity with each method; measure loss and accuracy of every copy."""
    obj = Objective(
        problem.model, problem.data, problem.loss, loss_fn=problem.loss_fn,
        params=parse_params(args.params), dtype=DTYPES.get(args.dtype), device=args.device,
    )  # fmt: skip
    structured = args.structure in ("heads", "channels")
    methods = _names(args.method or DEFAULT_METHODS["units" if structured else "weights"])
    patterned = not structured and args.structure != "unstructured"
    sparsities = [None] if patterned else _fractions(args.sparsity)
    m = args.gradients or "auto"
    dense = _measure(problem, problem.model)
    rows = []
    for method in methods:
        for sparsity in sparsities:
            start = time.perf_counter()
            try:
                plan = prune(
                    obj, sparsity, method, structure=args.structure, scope=args.scope,
                    recompute=args.recompute, curvature=_curvature(args, method),
                    damping=args.damping, m=m, seed=args.seed,
                )  # fmt: skip
            except ValueError as err:
                raise UsageError(str(err)) from err
            seconds = time.perf_counter() - start
            rows.append(_row(plan, _measure(problem, plan.apply(problem.model)), seconds))
    return _page(problem, args, dense, rows)


def _curvature(args: argparse.Namespace, method: str) -> str:
    """``--curvature`` for OBD and OBS (default: the empirical Fisher, as the library's).

    M-FAC and the structured scores always read the Fisher. The Hessian is indefinite on
    trained networks: OBS then raises the damping until the Cholesky factorization succeeds.
    """
    return (args.curvature or "fisher") if method in ("obd", "obs") else "fisher"


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("--method: name at least one method, e.g. magnitude,mfac.")
    return names


def _fractions(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(0 <= v < 1 for v in values):
        raise UsageError(f"--sparsity {text!r}: give fractions in [0, 1), e.g. 0.5,0.7,0.9.")
    return values


def _measure(problem: Any, model: torch.nn.Module) -> dict[str, Evaluation | None]:
    train = evaluate(model, problem.data, problem.loss, loss_fn=problem.loss_fn)
    test = None
    if problem.test_data is not None:
        test = evaluate(model, problem.test_data, problem.loss, loss_fn=problem.loss_fn)
    return {"train": train, "test": test}


def _row(plan: PrunePlan, measured: dict, seconds: float) -> dict:
    train, test = measured["train"], measured["test"]
    return {
        "method": plan.method,
        "sparsity": plan.sparsity,
        "removed_params": plan.removed_params,
        "total_params": plan.total_params,
        "train_loss": train.loss,
        "train_accuracy": train.accuracy,
        "test_loss": test.loss if test else None,
        "test_accuracy": test.accuracy if test else None,
        "curvature": plan.curvature,
        "damping": list(plan.damping),
        "relative_damping": list(plan.relative_damping),
        "predicted": list(plan.predicted),
        "skipped": list(plan.skipped),
        "seconds": seconds,
    }


COLUMNS = ("method", "sparsity", "removed", "train loss", "train acc", "test loss", "test acc",
           "damping (rel.)", "seconds")  # fmt: skip


def _page(problem: Any, args: argparse.Namespace, dense: dict, rows: list[dict]) -> Page:
    settings = {
        "structure": args.structure, "scope": args.scope, "recompute": args.recompute,
        "damping": args.damping, "curvature": args.curvature or "fisher", "seed": args.seed,
    }  # fmt: skip
    base = {k: (v.loss, v.accuracy) if v else None for k, v in dense.items()}
    train = cast(tuple, base["train"])  # _measure always measures the training data
    table = [
        [r["method"], r["sparsity"], f"{r['removed_params']}/{r['total_params']}",
         r["train_loss"], r["train_accuracy"], r["test_loss"], r["test_accuracy"],
         max(r["relative_damping"], default=None), r["seconds"]]
        for r in rows
    ]  # fmt: skip
    table.insert(0, ["(dense)", 0.0, "0", *train, *(base["test"] or (None, None)), None, 0])
    where = "held-out" if dense["test"] is not None else "training"
    text = (
        f"{problem.name}: {args.structure} pruning, {args.recompute} step(s), no retraining; "
        f"loss and accuracy measured on the training and {where} data. Damping is relative to "
        "the mean curvature diagonal, raised where a Cholesky factorization needed more."
    )
    doc = {"problem": problem.name, "settings": settings, "dense": base, "results": rows}
    section = Section("Pruning", text, COLUMNS, table, figure="prune.png")
    line = (base["test"] or train)[0]
    figure = _plot(rows, where, line)
    return Page(f"hesse prune: {problem.name}", doc, [section], {"prune.png": figure})


def _plot(rows: list[dict], where: str, dense: float) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "test_loss" if where == "held-out" else "train_loss"
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = [(r["sparsity"], r[key]) for r in rows if r["method"] == method]
        ax.plot(*zip(*points, strict=True), marker="o", label=method)
    ax.axhline(dense, color="gray", linestyle="--", label="dense")
    ax.set_xlabel("sparsity")
    ax.set_ylabel(f"{where} loss")
    ax.set_yscale("log")
    ax.legend()
    try:
        return png(fig)
    finally:
        plt.close(fig)
