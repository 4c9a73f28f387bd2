"""RESULTS.md of the pruning benchmark, from the measured results dictionary."""

from __future__ import annotations

from pathlib import Path
from statistics import mean

SECOND_ORDER = ("obd", "mfac", "layer_obs")


def _cell(loss, acc) -> str:
    return f"{loss:.3f} ({100 * acc:.1f}%)" if acc is not None else f"{loss:.3f}"


def _label(s) -> str:
    return s if isinstance(s, str) else f"{int(round(100 * s))}%"


def _grid(rows: list[dict], dense: dict, loss_key: str, acc_key: str) -> list[str]:
    targets = list(dict.fromkeys(r["sparsity"] for r in rows))
    lines = ["| method | schedule | " + " | ".join(map(_label, targets)) + " |",
             "|---|---|" + "---|" * len(targets)]  # fmt: skip
    lines.append("| (dense) | | " + " | ".join(
        [_cell(dense["test_loss"], dense["test_accuracy"])] * len(targets)) + " |")  # fmt: skip
    for key in dict.fromkeys((r["method"], r["schedule"]) for r in rows):
        cells = []
        for t in targets:
            hit = [r for r in rows if (r["method"], r["schedule"]) == key and r["sparsity"] == t]
            cells.append(_cell(hit[0][loss_key], hit[0][acc_key]) if hit else "")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return lines


def _verdicts(rows: list[dict], key: str) -> list[str]:
    out = []
    for t in dict.fromkeys(r["sparsity"] for r in rows):
        at = [r for r in rows if r["sparsity"] == t]
        mag = min(r[key] for r in at if r["method"] == "magnitude")
        best = min((r for r in at if r["method"] in SECOND_ORDER), key=lambda r: r[key])
        word = "beats" if best[key] < mag else "does NOT beat"
        out.append(
            f"- {_label(t)}: best second order ({best['method']}, {best['schedule']}) "
            f"{best[key]:.3f} {word} magnitude {mag:.3f}"
        )
    return out


def _unstructured(results: dict) -> list[str]:
    lines = []
    for model in dict.fromkeys(r["model"] for r in results["unstructured"]):
        rows = [r for r in results["unstructured"] if r["model"] == model]
        dense = results["dense"][model]
        lines += [f"### {model}", "", "Held-out loss (accuracy), **no retraining**:", ""]
        lines += _grid(rows, dense, "test_loss", "test_accuracy")
        lines += ["", f"Held-out loss (accuracy) after {results['settings']['fine_tune_steps']} "
                  "masked fine-tune steps:", ""]  # fmt: skip
        lines += _grid(rows, dense, "tuned_test_loss", "tuned_test_accuracy")
        skipped = sorted({n for r in rows for n in r["skipped"]})
        note = f" (2:4 leaves dense: {', '.join(skipped)})" if skipped else ""
        lines += ["", f"Second order against magnitude, held-out loss without retraining{note}:"]
        lines += _verdicts(rows, "test_loss")
        lines += ["", "After the fine-tune:"] + _verdicts(rows, "tuned_test_loss") + [""]
    return lines


def _structured(results: dict) -> list[str]:
    lines = []
    rows = results["structured"]
    for model, structure in dict.fromkeys((r["model"], r["structure"]) for r in rows):
        at = [r for r in rows if r["model"] == model and r["structure"] == structure]
        dense = results["dense"][model]
        lines += [f"### {model}: {structure}", "",
                  "| removed | params (before → after) | method | held-out loss (acc) | "
                  "after fine-tune |", "|---|---|---|---|---|",
                  f"| 0 | {at[0]['params_before']} | (dense) | "
                  f"{_cell(dense['test_loss'], dense['test_accuracy'])} | |"]  # fmt: skip
        for fraction in dict.fromkeys(r["fraction"] for r in at):
            for method in dict.fromkeys(r["method"] for r in at):
                hit = [r for r in at if r["fraction"] == fraction and r["method"] == method]
                name = method + (f" (mean of {len(hit)} seeds)" if len(hit) > 1 else "")
                loss = mean(r["test_loss"] for r in hit)
                acc = mean(r["test_accuracy"] for r in hit)
                tl = mean(r["tuned_test_loss"] for r in hit)
                ta = mean(r["tuned_test_accuracy"] for r in hit)
                lines.append(
                    f"| {hit[0]['units']} ({_label(fraction)}) | {hit[0]['params_before']} → "
                    f"{hit[0]['params_after']} | {name} | {_cell(loss, acc)} | {_cell(tl, ta)} |"
                )
        lines.append("")
    return lines


def _indefinite(ind: dict) -> list[str]:
    lines = [
        f"Digits MLP (64-32-10, {ind['d']} pruned weights), training loss "
        f"{ind['train_loss']:.3f}; exact Hessian eigenvalues from {ind['hessian_eigs'][0]:.3g} "
        f"to {ind['hessian_eigs'][1]:.3g} ({ind['negative_eigs']} negative); GGN smallest "
        f"{ind['ggn_min_eig']:.3g}. One-shot OBS at 70%, held-out loss (accuracy); magnitude: "
        f"{_cell(ind['magnitude']['test_loss'], ind['magnitude']['test_accuracy'])}.",
        "",
        "| curvature | damping asked (relative) | damping used | held-out loss (acc) | "
        "training loss |",
        "|---|---|---|---|---|",
    ]
    for r in ind["rows"]:
        lines.append(
            f"| {r['curvature']} | {r['damping']:g} | {r['used']:g} | "
            f"{_cell(r['test_loss'], r['test_accuracy'])} | {r['train_loss']:.3f} |"
        )
    return lines + [""]


def write_markdown(results: dict, path: Path) -> None:
    s, w = results["settings"], results["woodbury"]
    lines = [
        "# Pruning benchmark (measured)",
        "",
        "Command: `.venv/bin/python benchmarks/prune/run.py` (one CPU thread, "
        f"{results['seconds'] / 60:.1f} min; torch {results['machine']['torch']}). Held-out = "
        "20% of each data set, never trained on. Defaults: empirical Fisher of "
        f"m={s['m']} per-sample gradients, damping {s['damping']} x mean diagonal, M-FAC Fisher "
        f"blocks of {s['fisher_block']} weights; gradual = {s['gradual_steps']} steps with the "
        "curvature recomputed at the pruned weights (no training between them); fine-tune = "
        f"{s['fine_tune_steps']} optimizer steps with the masks kept. Pruned: weights of two "
        "or more dimensions outside embeddings. `mfac` is OBS (saliency and joint update) with "
        "the Woodbury inverse; `layer_obs` is the OBC/SparseGPT sweep per layer.",
        "",
        "## Unstructured and 2:4",
        "",
        *_unstructured(results),
        "## Heads and MLP neurons (removed for real)",
        "",
        "Equal removed parameters across methods at each row (all heads of a model, and all "
        "neurons, have the same size). `random` is the mean of 3 seeds.",
        "",
        *_structured(results),
        "## Indefinite Hessian (issue item 0)",
        "",
        *_indefinite(results["indefinite"]),
        "## WoodburyFisher speed",
        "",
        f"m = {w['m']}, d = {w['d']:,} ({w['dtype']}, gradients {w['grads_bytes'] / 2**30:.2f} "
        f"GiB, one CPU thread): **{w['F @ v']:.2f} products F @ v per second, "
        f"{w['F^-1 @ v']:.2f} inverse products per second**; building the operator "
        f"(Gram matrix) {w['build_seconds']:.1f} s, one sliding-window update "
        f"{w['update_seconds']:.2f} s. Nothing of size d x d is formed.",
        "",
    ]
    path.write_text("\n".join(lines))
