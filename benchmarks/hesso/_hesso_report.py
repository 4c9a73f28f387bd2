"""RESULTS.md of the HESSO benchmark, from the measured results dictionary."""

from __future__ import annotations

from pathlib import Path

HEAD = """# HESSO benchmark (measured)

Commands: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hesso/run.py` ({seconds:.0f} s, one
CPU thread shared with other jobs, torch {torch}), then only-train-once in its own venv
(`benchmarks/hesso/.venv/bin/python benchmarks/hesso/oto_run.py`, setup in its docstring) and
`.venv/bin/python benchmarks/hesso/run.py --report`. Models and data are benchmarks/prune's
(`_cases.demo_case("digits")`, `_cases.bert_case()`: a 2-layer BERT from a config on digits read
as 17 patch tokens). Held-out = 20% of each data set, never trained on. Fine-tune budget =
{tune} optimizer steps. Rows:

- `hesso tuned`: HESSO from the trained model for the fine-tune budget (pruning over the first
  200 steps in 4 periods, then 100 steps with the pruned groups held at zero);
- `hesso+cric tuned`: the same after CRIC (cycles of 25 steps, at most 4; its steps are extra);
- `hesso scratch`: HESSO from the initialisation for the dense training budget plus the
  fine-tune budget (pruning from 30% to 70% of the run, 5 periods): train and prune in one run;
- `<saliency> + fine-tune`: prune-after-training: the trained model, groups removed lowest score
  first (each layer keeps one) until at least as many parameters are gone as `hesso tuned`
  removed, then the fine-tune budget with the removed groups held at zero. `obs` also applies
  the joint OBS update (dense damped empirical Fisher) before the fine-tune.

Parameters and bytes are those of the model after the groups are really removed
(`torch.save` of its state dict). "before tune" is the held-out accuracy right after pruning.
"""


def _span(values, fmt) -> str:
    lo, hi = min(values), max(values)
    return fmt(lo) if lo == hi else f"{fmt(lo)}-{fmt(hi)}"


def _row(rs: list[dict], show_widths: bool) -> str:
    """One method at one target, over its seeds: mean accuracy (min-max)."""
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    accs = [r["test_accuracy"] for r in rs]
    acc = pct(sum(accs) / len(accs)) + (f" ({_span(accs, pct)})" if len(rs) > 1 else "")
    before = [r["before_tune"]["test_accuracy"] for r in rs if r.get("before_tune")]
    n = max(r.get("cric_cycles") or 0 for r in rs)
    cyc = f" (<= {n} cycle{'s' if n > 1 else ''})" if n else ""
    loss = sum(r["test_loss"] for r in rs) / len(rs)
    shapes = " / ".join(dict.fromkeys(str(tuple(r["widths"])) for r in rs))
    widths = f" | {shapes}" if show_widths else ""
    return (
        f"| {rs[0]['method']}{cyc} | {_span([r['steps'] for r in rs], str)} "
        f"| {_span([r['groups'] for r in rs], str)} | {_span([r['params'] for r in rs], str)}"
        f"{widths} | {_span([r['bytes'] for r in rs], str)} "
        f"| {_span(before, pct) if before else ''} | **{acc}** | {loss:.3f} "
        f"| {sum(r['seconds'] for r in rs) / len(rs):.1f} |"
    )


def _case(name: str, case: dict) -> list[str]:
    d = case["dense"]
    lines = [
        f"## {name}",
        "",
        f"Dense: {d['params']} parameters, {d['bytes']} bytes, held-out accuracy "
        f"{100 * d['test_accuracy']:.1f}% (loss {d['test_loss']:.3f}), trained for "
        f"{case['dense_steps']} steps; {case['groups']} prunable groups.",
    ]
    rows = case["rows"]
    seeds = sorted({r.get("seed", 0) for r in rows})
    wide = len(rows[0]["widths"]) <= 4
    lines.append("")
    lines.append(f"Seeds (batch order, NViT's gradient draw): {seeds}; accuracy is their mean "
                 "(min-max), loss and seconds their mean.")  # fmt: skip
    for s in dict.fromkeys(r["sparsity"] for r in rows):
        lines += [
            "",
            f"### {int(round(100 * s))}% of the groups (HESSO's target)",
            "",
            "| method | steps | groups removed | params"
            + (" | layer widths" if wide else "")
            + " | bytes | before tune | held-out acc | held-out loss | seconds |",
            "|---|---|---|---|---|---|---|---|---|" + ("---|" if wide else ""),
        ]
        for m in dict.fromkeys(r["method"] for r in rows):
            lines.append(_row([r for r in rows if r["sparsity"] == s and r["method"] == m], wide))
    return lines


def _oto(oto: dict | None) -> list[str]:
    lines = ["", "## only-train-once (the reference implementation)", ""]
    if oto is None:
        return lines + ["Not run: `benchmarks/hesso/oto_run.py` wrote no `.cache/oto.json`."]
    lines += [
        "only-train-once 3.0.1 `OTO(model, dummy_input).hesso(...)` (run by `oto_run.py` in its "
        "own venv) with the schedules, data and batch order of the hesse rows (seed 0); its own "
        "dependency graph defines the groups (on BERT they differ from hesse's, so equal group "
        "fractions are not equal parameter counts); `construct_subnet` builds the small model.",
        "",
        "| model | target | method | steps | groups | params | layer widths | bytes "
        "| held-out acc | held-out loss | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    return lines + [_oto_line(r) for r in oto["rows"]]


def _oto_line(r: dict) -> str:
    head = f"| {r['model']} | {int(100 * r['sparsity'])}% | {r['method']} "
    if "error" in r:
        return head + f"| failed: {r['error'][:120]} |" + " |" * 7
    widths = str(tuple(r["widths"])) if r["model"] == "digits" else ""
    return head + (
        f"| {r['steps']} | {r['groups']} | {r['params']} | {widths} | {r['bytes']} "
        f"| **{100 * r['test_accuracy']:.1f}%** | {r['test_loss']:.3f} | {r['seconds']:.1f} |"
    )


def write_results(results: dict, path: Path) -> None:
    lines = [
        HEAD.format(
            seconds=results["seconds"], torch=results["torch"], tune=results["fine_tune_steps"]
        )
    ]
    for name, case in results["cases"].items():
        lines += _case(name, case) + [""]
    lines += _oto(results.get("oto"))
    path.write_text("\n".join(lines) + "\n")
