"""Measured benchmark of hesse.quant: Hessian allocations against uniform, random and HAWQ-V1.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quant/run.py      (6-8 min, one thread)

Writes benchmarks/quant/results.json and benchmarks/quant/RESULTS.md. Models: the digits CNN
and the tiny-lm transformer demos (held out: a fifth of the samples), and a BERT-style
classifier built from a config and trained here (bert_task.py).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from scipy.stats import spearmanr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import baselines  # noqa: E402
import bert_task  # noqa: E402

import report  # noqa: E402
from hesse import Objective, quant  # noqa: E402
from hesse.demo import load_demo  # noqa: E402

WIDTHS = (2, 3, 4, 5, 6, 8)
TRACE_BUDGET, EIG_BUDGET, RANDOM_SEEDS = 100, 40, 5
BUDGET_BITS = (2.5, 3, 3.5, 4)  # budgets: bits per weight on average


@dataclass
class Problem:
    name: str
    model: torch.nn.Module
    calib: list  # sensitivity and reconstruction data (part of the training data)
    train: list
    test: list
    loss: object = None
    loss_fn: object = None
    group_size: int = 16  # Q-BERT: rows per group (one attention head's rows)
    encoder: tuple = ()  # layers quantized in the Q-BERT table (the encoder's matrices)

    def objective(self, data=None) -> Objective:
        return Objective(self.model, data or self.calib, self.loss, loss_fn=self.loss_fn)

    def measure(self, model: torch.nn.Module) -> dict:
        train = quant.evaluate(model, self.train, self.loss, loss_fn=self.loss_fn)
        test = quant.evaluate(model, self.test, self.loss, loss_fn=self.loss_fn)
        return {"train_loss": train.loss, "test_loss": test.loss, "test_acc": test.accuracy}


def problems() -> list[Problem]:
    digits = load_demo("digits", holdout=0.2)
    lm = load_demo("tiny-lm", holdout=0.2)
    bert, train, test = bert_task.trained()
    lm_blocks = tuple(n for n in quant.quantizable(lm.model) if n.startswith("blocks."))
    encoder = tuple(n for n in quant.quantizable(bert) if ".encoder." in n)
    return [
        Problem("digits CNN", digits.model, digits.batches(), digits.batches(),
                digits.test_batches(), digits.loss),
        Problem("tiny-lm transformer", lm.model, lm.batches(samples=256, batch_size=64),
                lm.batches(), lm.test_batches(), loss_fn=lm.loss_fn, encoder=lm_blocks),
        Problem("BERT-style classifier", bert, train[:1], train, test, encoder=encoder),
    ]  # fmt: skip


def allocations(p: Problem, sens, eig, base: dict) -> list[dict]:
    """Every method at the sizes of 2.5, 3, 3.5 and 4 bits per weight."""
    rows = []
    for b in BUDGET_BITS:
        budget = sum(r.n_params for r in sens.layers) * b / 8
        low = max(w for w in WIDTHS if w <= b)
        found = {
            f"uniform {low}-bit": baselines.uniform(sens, low),
            "HAWQ-V1 order (λmax/n)": baselines.hawq_v1(eig, WIDTHS, budget),
            "HAWQ-V2 Ω-optimal (ours)": quant.allocate(sens, budget, frontier=0).bits,
        }
        for method, bits in found.items():
            m = p.measure(quant.quantize(p.model, bits))
            rows.append({"budget_bits": b, "method": method, "size": baselines.size(sens, bits),
                         "predicted": _omega(sens, bits), "bits": bits} | m)  # fmt: skip
        rows.append(_random(p, sens, budget, b))
        rows.append(_search(p, sens, budget, b, rows[-4]["train_loss"] - base["train_loss"]))
    return rows


def _random(p: Problem, sens, budget: float, b: int) -> dict:
    runs = []
    for seed in range(RANDOM_SEEDS):
        bits = baselines.random_allocation(sens, WIDTHS, budget, seed)
        runs.append(p.measure(quant.quantize(p.model, bits)) | {"size": baselines.size(sens, bits)})
    mean = {k: statistics.fmean(r[k] for r in runs) for k in runs[0] if runs[0][k] is not None}
    return {"budget_bits": b, "method": f"random (mean of {RANDOM_SEEDS})", "predicted": None,
            "bits": None, "test_acc": None} | mean  # fmt: skip


def _search(p: Problem, sens, budget: float, b: int, tolerance: float) -> dict:
    """Bisection: the cheapest frontier point whose training loss is at most uniform's."""

    def metric(model):
        return quant.evaluate(model, p.train, p.loss, loss_fn=p.loss_fn).loss

    r = quant.search(p.objective(), metric, budget=budget, tolerance=tolerance, sens=sens,
                     bits=WIDTHS)  # fmt: skip
    m = p.measure(quant.quantize(p.model, r.bits))
    return {"budget_bits": b, "method": "bisection search (train loss ≤ uniform's)",
            "size": r.cost, "predicted": r.predicted, "bits": r.bits, "met": r.met,
            "evaluations": len(r.evaluations)} | m  # fmt: skip


def _omega(sens, bits: dict) -> float:
    return sum(sens[n].omega[b] for n, b in bits.items())


def single_layer(p: Problem, sens, eig, base: dict) -> dict:
    """Spearman of Ω (trace and eig) against the measured loss rise of one layer quantized."""
    pairs = []
    for row in sens.layers:
        for b in (2, 3, 4):
            m = p.measure(quant.quantize(p.model, {row.name: b}))
            rise = (m["train_loss"] - base["train_loss"], m["test_loss"] - base["test_loss"])
            pairs.append((row.omega[b], eig[row.name].omega[b], *rise))
    trace_o, eig_o, rise_train, rise_test = zip(*pairs, strict=True)
    return {
        "n_pairs": len(pairs),
        "trace_vs_train": spearmanr(trace_o, rise_train).statistic,
        "trace_vs_test": spearmanr(trace_o, rise_test).statistic,
        "eig_vs_train": spearmanr(eig_o, rise_train).statistic,
    }


def qbert_groups(p: Problem) -> list[dict]:
    rows = []
    for b in (2, 3, 4):
        for label, q in (("per tensor (no groups)", quant.Quantizer(b, "tensor")),
                         (f"groups of {p.group_size} rows (Q-BERT)",
                          quant.Quantizer(b, "rows", p.group_size)),
                         ("per row", quant.Quantizer(b, "channel"))):  # fmt: skip
            bits = {n: b for n in p.encoder}
            rows.append(
                {"bits": b, "quantizer": label} | p.measure(quant.quantize(p.model, bits, q))
            )
    return rows


def aphq(p: Problem) -> list[dict]:
    obj, rows = p.objective(), []
    for b in (3, 4):
        bits = {n: b for n in quant.quantizable(p.model)}
        start = time.perf_counter()
        found = {"round-to-nearest": quant.quantize(p.model, bits)}
        for w in ("mse", "aphq"):
            found[f"reconstruction, {w}"] = quant.reconstruct(obj, bits, weighting=w, lr=1e-2)
        rows += [{"bits": b, "method": k} | p.measure(m) for k, m in found.items()]
        rows[-1]["seconds"] = time.perf_counter() - start
    return rows


def switching(p: Problem, sens) -> list[dict]:
    widths = (8, 6, 4, 3, 2)
    hessian = quant.BitSwitch(p.model, widths, sens=sens)
    flipped = replace(
        sens, layers=tuple(replace(r, score=1 / max(r.score, 1e-30)) for r in sens.layers)
    )
    reverse = quant.BitSwitch(p.model, widths, sens=flipped)
    rows = [{"kind": "uniform", "bits": b, "size": baselines.size(sens, baselines.uniform(sens, b)),
             "switched": p.measure(hessian.model(b))["test_loss"],
             "direct": p.measure(quant.quantize(p.model, baselines.uniform(sens, b)))["test_loss"]}
            for b in widths]  # fmt: skip
    for b in (6, 4, 3):  # the first step of each schedule within the size of uniform b-bit
        target = baselines.size(sens, baselines.uniform(sens, b))
        ours = next(s for s in hessian.schedule() if s.size_bytes <= target)
        theirs = next(s for s in reverse.schedule() if s.size_bytes <= target)
        rows.append({"kind": "mixed", "bits": b, "size": target,
                     "uniform": next(r["switched"] for r in rows if r.get("bits") == b),
                     "hessian_size": ours.size_bytes,
                     "hessian_order": p.measure(hessian.model(ours.bits))["test_loss"],
                     "reverse_size": theirs.size_bytes,
                     "reverse_order": p.measure(hessian.model(theirs.bits))["test_loss"],
                     })  # fmt: skip
    return rows


def study(p: Problem) -> dict:
    print(f"== {p.name}", flush=True)
    obj = p.objective()
    start = time.perf_counter()
    sens = quant.sensitivity(obj, WIDTHS, budget=TRACE_BUDGET)
    t_trace = time.perf_counter() - start
    eig = quant.sensitivity(obj, WIDTHS, method="eig", budget=EIG_BUDGET)
    t_eig = time.perf_counter() - start - t_trace
    base = p.measure(p.model)
    out = {"float": base, "sensitivity": sens.to_json(), "eig": eig.to_json(),
           "seconds": {"trace": t_trace, "eig": t_eig}}  # fmt: skip
    out["allocations"] = allocations(p, sens, eig, base)
    out["spearman"] = single_layer(p, sens, eig, base)
    if p.encoder:
        out["qbert"] = qbert_groups(p)
    if p.name.startswith("tiny-lm"):
        out["aphq"] = aphq(p)
    if not p.name.startswith("BERT"):
        out["switching"] = switching(p, sens)
    print(f"   done in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    results = {"widths": WIDTHS, "trace_budget": TRACE_BUDGET, "eig_budget": EIG_BUDGET,
               "torch": torch.__version__, "models": {}}  # fmt: skip
    for p in problems():
        results["models"][p.name] = study(p)
    (HERE / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (HERE / "RESULTS.md").write_text(report.markdown(results))
    print((HERE / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
