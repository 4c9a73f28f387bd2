"""``hesse prune``: measured loss and accuracy against sparsity for each pruning method."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from typing import Any, cast

import torch

from ..problem._evaluate import Evaluation, evaluate
from ..problem.objective import Objective
from ..prune import GROUP_METHODS, WEIGHT_METHODS, PrunePlan, SavedCheckpoint, prune, save
from ..report.page import Page, Section, png
from ._inputs import UsageError, parse_params

SUMMARY = "Second-order pruning (OBD, OBS, M-FAC, layer-wise OBS, heads, neurons), measured."
EXAMPLES = """examples:
  hesse prune --demo digits --sparsity 0.5,0.7,0.9 --method magnitude,mfac,layer_obs
  hesse prune --demo digits --method obd,obs --curvature fisher --damping 0.01
  hesse prune --demo digits --structure 2:4 --method magnitude,mfac --recompute 4
  hesse prune --demo tiny-lm --structure heads --method nvit,magnitude,random --sparsity 0.5
  hesse prune --hf DIR --data calib.csv --method sparsegpt --structure 2:4 --save OUT
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
        "--save",
        metavar="DIR",
        help="save the pruned model (one method, one sparsity; --hf models) as a Hugging Face "
        "folder: dense with zeros (from_pretrained), or shrunk (hesse.prune.load)",
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
    if args.save and len(methods) * len(sparsities) != 1:
        raise UsageError(
            f"--save {args.save}: name one method and one sparsity (got --method "
            f"{','.join(methods)} and {len(sparsities)} sparsities), e.g. --method sparsegpt "
            "--sparsity 0.5."
        )
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
            pruned = plan.apply(problem.model)
            rows.append(_row(plan, _measure(problem, pruned), seconds))
            if args.save:
                rows[-1]["saved"] = _saved(_save(pruned, args))
    return _page(problem, args, dense, rows)


def _save(model: torch.nn.Module, args: argparse.Namespace) -> SavedCheckpoint:
    """``--save``: the pruned model as a Hugging Face folder, with the tokenizer of ``--hf``."""
    if not args.hf:
        raise UsageError(
            f"--save {args.save}: saving writes a Hugging Face folder; load the model with --hf "
            "(demos and --model factories: prune in Python and torch.save the copy)."
        )
    from transformers import AutoTokenizer

    return save(model, args.save, tokenizer=AutoTokenizer.from_pretrained(args.hf))


def _saved(saved: SavedCheckpoint) -> dict:
    return {
        "path": str(saved.path), "format": saved.format, "total_bytes": saved.total_bytes,
        "weight_bytes": saved.weight_bytes, "params_on_disk": saved.params_on_disk,
        "zeros": saved.zeros,
        "load": "from_pretrained" if saved.format == "dense" else "hesse.prune.load",
    }  # fmt: skip


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
        "calibration": asdict(plan.calibration) if plan.calibration else None,
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
    text += "".join(_notes(r) for r in rows)
    doc = {"problem": problem.name, "settings": settings, "dense": base, "results": rows}
    section = Section("Pruning", text, COLUMNS, table, figure="prune.png")
    line = (base["test"] or train)[0]
    figure = _plot(rows, where, line)
    return Page(f"hesse prune: {problem.name}", doc, [section], {"prune.png": figure})


def _notes(row: dict) -> str:
    """Memory of a SparseGPT calibration, and the saved folder, in words."""
    words, c, saved = "", row["calibration"], row.get("saved")
    if c:
        how = "block by block" if c["sequential"] else "in one pass"
        words += (
            f" {row['method']} at {row['sparsity']:g} calibrated {how} ({c['pieces']} passes), "
            f"holding at most {c['peak_bytes'] / 2**20:.2f} MiB of layer inputs and Hessians "
            f"(planned {c['planned_bytes'] / 2**20:.2f} MiB; process peak "
            f"{c['rss_bytes'] / 2**20:.0f} MiB)."
        )
    if saved:
        words += (
            f" Saved to {saved['path']}: {saved['total_bytes']:,} bytes "
            f"({saved['weight_bytes']:,} of weights, {saved['params_on_disk']:,} numbers of "
            f"which {saved['zeros']:,} zero, {saved['format']}); load it with {saved['load']}."
        )
    return words


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
