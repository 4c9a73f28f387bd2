"""Optimizer benchmark: hesse.optim against SGD/AdamW and pytorch_optimizer on the two demos.

Run with the benchmarks venv (it has pytorch_optimizer):

    OMP_NUM_THREADS=1 benchmarks/.venv/bin/python benchmarks/optim/run.py

Every optimizer trains a fresh model (seed 0) on the training part of the demo's seeded
80/20 split for the same number of epochs at each learning rate of a small grid, in its own
process (so that its peak memory can be read); the learning rate with the lowest final
training loss is kept, and hesse measures the top Hessian eigenvalue and the trace of that
model. Writes RESULTS.md and results.json next to this file.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import _train
import torch

from hesse import HessianOperator, Objective, optim

HERE = Path(__file__).resolve().parent
SGD_LR = [0.03, 0.1, 0.3]
SMALL_LR = [1e-3, 3e-3, 1e-2]
GRIDS = {
    "SGD": SGD_LR,
    "AdamW": SMALL_LR,
    "AdaHessian": [0.03, 0.1, 0.3],
    "SophiaH": SMALL_LR,
    "SophiaG": SMALL_LR,
    "SAM": SGD_LR,
    "M-FAC": [1e-4, 1e-3, 1e-2],
    "trace penalty": SGD_LR,
    "AdaHessian (all -1 probes)": [0.03, 0.1, 0.3],
    "pytorch_optimizer AdaHessian": [0.03, 0.1, 0.3],
    "pytorch_optimizer SophiaH": [lr / _train.PEER_CLIP for lr in SMALL_LR],
}
TINY_LM_GRIDS = {  # where tiny-lm needs other values; the all -1 probes run on digits only
    "AdaHessian": [0.01, 0.03, 0.1],
    "pytorch_optimizer AdaHessian": [0.01, 0.03, 0.1],
    "trace penalty": [0.1, 0.3],
    "AdaHessian (all -1 probes)": [],
}
EPOCHS = {"digits": 20, "tiny-lm": 4}
BUDGET = {"digits": 60, "tiny-lm": 30}


def problem(name: str, epochs: int | None = None) -> _train.Problem:
    epochs = epochs or EPOCHS[name]
    return _train.digits_problem(epochs) if name == "digits" else _train.tiny_lm_problem(epochs)


def worker(demo: str, name: str, epochs: int | None, grid: list[float]) -> dict:
    """Train ``name`` at every learning rate of ``grid``; curvature of the best model."""
    torch.set_num_threads(1)
    prob = problem(demo, epochs)
    if name == "baseline":
        model = prob.build()
        prob.evaluate(model, prob.train)
        return {"peak_rss_mb": _peak_mb()}
    runs, best, best_model = [], None, None
    for lr in grid:
        run, model = _train.train(prob, name, lr)
        runs.append(run)
        if not run["diverged"] and (best is None or run["train"]["loss"] < best["train"]["loss"]):
            best, best_model = run, model
    out = {"runs": runs, "best": best, "peak_rss_mb": _peak_mb()}  # before the curvature
    if best_model is not None:
        out["curvature"] = prob.curvature(best_model, BUDGET[demo])
    return out


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _spawn(demo: str, name: str, epochs: int | None, grid: list[float]) -> dict:
    args = [sys.executable, __file__, "--worker", demo, name, "--grid", json.dumps(grid)]
    if epochs:
        args += ["--epochs", str(epochs)]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def cost_ratio(demo: str, reps: int = 50) -> dict:
    """Seconds of a gradient, and of a gradient with a diagonal estimate, on one batch."""
    prob = problem(demo, 1)
    model = prob.build()
    params = list(model.parameters())
    batch = prob.batches(torch.Generator().manual_seed(0))[0]
    gen = torch.Generator().manual_seed(0)

    def gradient():
        torch.autograd.grad(prob.logits_and_loss(model, batch)[1], params)

    def with_estimate(est):
        def run():
            logits, loss = prob.logits_and_loss(model, batch)
            g = torch.autograd.grad(loss, params, create_graph=est.needs_graph, retain_graph=True)
            est.contribution(est.draw(params, gen), params, g, logits, gen)

        return run

    fns = {
        "gradient": gradient,
        "hutchinson": with_estimate(optim.Hutchinson()),
        "gnb": with_estimate(optim.GaussNewtonBartlett()),
    }
    samples = {k: [] for k in fns}
    for _ in range(reps):  # interleaved, so that load on the machine hits all alike
        for label, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[label].append(time.perf_counter() - start)
    out = {k: sorted(v)[reps // 2] for k, v in samples.items()}
    out["reps"] = reps
    for k in ("hutchinson", "gnb"):
        out[f"ratio_{k}"] = out[k] / out["gradient"]
        out[f"amortized_{k}"] = (9 + out[f"ratio_{k}"]) / 10
    return out


def step_times(
    demo: str, lrs: dict[str, float], rounds: int = 7, block: int = 10
) -> dict[str, float]:
    """Seconds per training step of each optimizer: the median over rounds of the mean step.

    Each round runs ``block`` consecutive steps of every optimizer in turn (so one refresh of
    an ``update_every=10`` estimate falls in every block, and load from other processes on a
    shared machine spreads over all optimizers alike). The first round warms up.
    """
    prob = problem(demo, 1)
    batch = prob.batches(torch.Generator().manual_seed(0))[0]
    setups = {}
    for name, lr in lrs.items():
        model = prob.build()
        setups[name] = (model, _train.make_optimizer(name, model.parameters(), lr))
    means = {name: [] for name in setups}
    for _ in range(rounds):
        for name, (model, opt) in setups.items():
            start = time.perf_counter()
            for i in range(block):
                _train._step(name, opt, model, batch, prob, i)
            means[name].append((time.perf_counter() - start) / block)
    return {name: sorted(m[1:])[(rounds - 1) // 2] for name, m in means.items()}


def _retime(doc: dict) -> None:
    """Add the interleaved step times to every demo of ``doc``."""
    for demo, out in doc["demos"].items():
        lrs = {n: v["best"]["lr"] for n, v in out.items() if n in GRIDS and v["best"]}
        out["step_times"] = step_times(demo, lrs)


def probe_bug(samples: int = 256) -> dict:
    """How far the all -1 probes' "diagonal" (row sums of H) is from the true diagonal."""
    prob = problem("digits", 1)
    model = prob.build()
    x, y = prob.train
    data = [(x[:samples], y[:samples])]
    H = HessianOperator(Objective(model, data, prob.loss))
    d = H.shape[0]
    eye = torch.eye(d, dtype=H.dtype)
    diag = torch.cat([(H @ eye[:, i : i + 512])[i : i + 512].diagonal() for i in range(0, d, 512)])
    rows = H @ torch.ones(d, dtype=H.dtype)
    gen = torch.Generator().manual_seed(0)
    Z = torch.stack([optim.rademacher(torch.empty(d), gen) for _ in range(10)], 1).to(H.dtype)
    hutch = Z * (H @ Z)

    def rel(est):
        return float((est - diag).norm() / diag.norm())

    return {
        "parameters": d,
        "samples": samples,
        "relative_error_row_sums": rel(rows),
        "relative_error_hutchinson_1_probe": rel(hutch[:, 0]),
        "relative_error_hutchinson_10_probes": rel(hutch.mean(1)),
        "sign_disagreement_row_sums": float((rows.sign() != diag.sign()).double().mean()),
        "correlation_row_sums": float(torch.corrcoef(torch.stack([rows, diag]))[0, 1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", nargs=2, metavar=("DEMO", "OPTIMIZER"))
    parser.add_argument("--grid", type=json.loads)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--quick", action="store_true", help="1 epoch, one learning rate each")
    parser.add_argument("--only", nargs="*", help="optimizers to run (default: all)")
    parser.add_argument(
        "--retime", action="store_true", help="only redo the step times of results.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.epochs, args.grid)))
        return
    import report

    if args.retime:
        doc = json.loads((HERE / "results.json").read_text())
        _retime(doc)
        (HERE / "results.json").write_text(json.dumps(doc, indent=1))
        (HERE / "RESULTS.md").write_text(report.markdown(doc))
        return
    start = time.perf_counter()
    doc = {"settings": _settings(args), "demos": {}}
    for demo in ("digits", "tiny-lm"):
        epochs = 1 if args.quick else None
        out = {"baseline": _spawn(demo, "baseline", epochs, [])}
        for name, grid in GRIDS.items():
            grid = TINY_LM_GRIDS.get(name, grid) if demo == "tiny-lm" else grid
            if not grid or (args.only and name not in args.only):
                continue
            grid = grid[1:2] if args.quick else grid
            out[name] = _spawn(demo, name, epochs, grid)
            print(f"{demo:8s} {name:32s} {time.perf_counter() - start:7.1f} s", flush=True)
        out["cost"] = cost_ratio(demo)
        lrs = {n: out[n]["best"]["lr"] for n in ("SGD", "SAM", "trace penalty") if _ok(out, n)}
        if "SGD" in lrs:
            out["matched_flatness"] = _train.matched_flatness(
                problem(demo, epochs), lrs, BUDGET[demo]
            )
        doc["demos"][demo] = out
    _retime(doc)
    doc["probe_bug"] = probe_bug()
    doc["seconds"] = time.perf_counter() - start
    (HERE / "results.json").write_text(json.dumps(doc, indent=1))
    (HERE / "RESULTS.md").write_text(report.markdown(doc))
    print(f"wrote RESULTS.md and results.json in {doc['seconds']:.0f} s")


def _ok(out: dict, name: str) -> bool:
    return name in out and out[name]["best"] is not None


def _settings(args) -> dict:
    from importlib.metadata import version

    return {
        "epochs": {k: 1 if args.quick else v for k, v in EPOCHS.items()},
        "grids": {"digits": GRIDS, "tiny-lm": {**GRIDS, **TINY_LM_GRIDS}},
        "selection": "lowest final training loss among runs that did not diverge",
        "torch": torch.__version__,
        "pytorch_optimizer": version("pytorch-optimizer"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": 1,
        "trace_penalty_weight": _train.PENALTY,
    }


if __name__ == "__main__":
    main()
