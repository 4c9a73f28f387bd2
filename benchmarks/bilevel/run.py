"""Bilevel benchmark: upper-level objective against wall time on hyper-cleaning and per-block decay.

Methods: ``hesse.bilevel.solve`` with ``bsvr`` (mini-batches), ``lvhba`` (mini-batches) and
``implicit`` (full batch, CG); on the decay problem also ``hesse.influence.hypergradient`` (the
implicit-function hypergradient of an ``Objective``, CG) in the same outer loop; and torchopt's
implicit differentiation when ``.cache/torchopt.json`` exists (run peer_torchopt.py first, in
benchmarks/bilevel/.venv). Every method's checkpoints are scored the same way: the lower level
re-solved at the checkpoint's hyperparameters (L-BFGS), then the validation loss
:math:`F(x) = f(x, y^*(x))` and the test accuracy. Writes RESULTS.md and results.png.

Usage (from benchmarks/bilevel, about 10 minutes on one core):
    .venv/bin/python peer_torchopt.py          # optional, the torchopt rows
    OMP_NUM_THREADS=1 ../../.venv/bin/python run.py
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from problems import Problem, cleaning, decay
from run_config import CONFIG
from torch import nn

from hesse import Objective
from hesse.bilevel import BSVROptions, ImplicitOptions, LVHBAOptions, solve
from hesse.influence import hypergradient

torch.set_num_threads(1)
HERE = Path(__file__).parent
OPTIONS = {"bsvr": BSVROptions, "lvhba": LVHBAOptions, "implicit": ImplicitOptions}


def score(P: Problem, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """``(F(x), test accuracy)`` with the lower level re-solved at ``x``."""
    yr = P.retrain(x, y, 100)
    return float(P.upper(None, yr, None)), P.test_accuracy(yr)


def hesse_run(P: Problem, method: str, cfg: dict, batch: int) -> dict:
    cfg = dict(cfg)
    steps, shift = cfg.pop("steps"), cfg.pop("x_shift", 0.0)
    x0, y0 = P.init()
    ckpts: list = []
    r = solve(
        P.upper,
        P.lower,
        x0 + shift,
        y0,
        method=method,
        options=OPTIONS[method](**cfg),
        data=P.sampler(None if method == "implicit" else batch),
        steps=steps,
        log_every=max(1, steps // CONFIG["checkpoints"]),
        callback=lambda t, x, y: ckpts.append((x.clone(), y.clone())),
    )
    T = r.trajectory
    scores = [score(P, x, y) for x, y in ckpts]
    return {
        "method": f"hesse {method}",
        "steps": T.steps,
        "seconds": T.seconds,
        "upper": T.upper,
        "F": [s[0] for s in scores],
        "acc": [s[1] for s in scores],
        "n_hvps": r.n_hvps,
        "n_grads": r.n_grads,
        "x": r.hparams,
    }


class _Blocks(nn.Module):
    """The per-block logistic regression as a module, for ``hesse.influence``'s ``Objective``."""

    def __init__(self, P: Problem, y: torch.Tensor):
        super().__init__()
        self.w = nn.ParameterList([nn.Parameter(p.clone()) for p in P.unflatten(y)])

    def forward(self, X):
        # index one by one: slicing a ParameterList re-wraps its tensors as new leaves
        return X @ torch.cat([self.w[i] for i in range(len(self.w) - 1)]) + self.w[-1]


def influence_run(P: Problem, cfg: dict) -> dict:
    """The decay problem with ``hesse.influence.hypergradient`` (CG) as the hypergradient.

    Same schedule as ``implicit``; ``curvature="ggn"`` is the exact Hessian of a linear model's
    cross-entropy and is declared PSD, so CG runs without a definiteness check.
    """
    x, y = P.init()
    x = x + cfg.get("x_shift", 0.0)
    steps, every = cfg["steps"], max(1, cfg["steps"] // CONFIG["checkpoints"])
    rows, ckpts, seconds, hvps, grads = [], [], 0.0, 0, 0
    for t in range(steps + 1):
        if t % every == 0 or t == steps:
            rows.append((t, seconds, float(P.upper(x, y, None)), hvps, grads))
            ckpts.append((x.clone(), y.clone()))
        if t == steps:
            break
        tick = time.perf_counter()
        for _ in range(cfg["inner_steps"]):
            y_ = y.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(P.lower(x, y_, None), y_)
            y = y - cfg["inner_lr"] * g
        model = _Blocks(P, y).eval()
        inner = Objective(model, [(P.Xtr, P.ytr)], F.cross_entropy)
        outer = Objective(model, [(P.Xval, P.yval)], F.cross_entropy)
        c = torch.exp(x)
        r = hypergradient(
            inner,
            outer,
            c,
            ihvp="cg",
            curvature="ggn",
            tol=cfg["tol"],
            max_matvecs=cfg["max_matvecs"],
        )
        x = x - cfg["lr"] * c * r.value  # d/dx = c * d/dc for c = exp(x)
        seconds += time.perf_counter() - tick
        hvps += r.inverse.n_matvecs
        grads += cfg["inner_steps"] + 1
    scores = [score(P, a, b) for a, b in ckpts]
    cols = list(zip(*rows, strict=True))
    return {
        "method": "hesse influence.hypergradient",
        "steps": cols[0],
        "seconds": cols[1],
        "upper": cols[2],
        "F": [s[0] for s in scores],
        "acc": [s[1] for s in scores],
        "n_hvps": hvps,
        "n_grads": grads,
        "x": x,
    }


def torchopt_run(P: Problem, name: str) -> dict | None:
    path = HERE / ".cache" / "torchopt.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())[name]
    D = torch.float64
    scores = [
        score(P, torch.tensor(x, dtype=D), torch.tensor(y, dtype=D))
        for _, x, y in data["checkpoints"]
    ]
    steps, seconds, upper = zip(*data["rows"], strict=True)
    return {
        "method": "torchopt implicit (custom_root + CG)",
        "steps": steps,
        "seconds": seconds,
        "upper": upper,
        "F": [s[0] for s in scores],
        "acc": [s[1] for s in scores],
        "n_hvps": None,
        "n_grads": None,
        "x": torch.tensor(data["checkpoints"][-1][1], dtype=D),
    }


def cleaning_extra(P: Problem, x: torch.Tensor) -> str:
    w = torch.sigmoid(x)
    flipped = P.flipped
    assert flipped is not None
    caught = float((w[flipped] < 0.5).double().mean())
    kept = float((w[~flipped] >= 0.5).double().mean())
    return f" {caught:.3f} | {kept:.3f} |"


def table(P: Problem, runs: list[dict]) -> list[str]:
    extra = P.name == "cleaning"
    head = "| method | steps | wall s | HVPs | grads | f(x, y) at its y | F(x), y re-solved |"
    head += " test acc |"
    head += " flipped caught | clean kept |" if extra else ""
    sep = "|" + "---|" * (8 + 2 * extra)
    lines = [head, sep]
    for r in runs:
        n = lambda v: "n/a" if v is None else str(v)  # noqa: E731
        row = (
            f"| {r['method']} | {r['steps'][-1]} | {r['seconds'][-1]:.1f} | {n(r['n_hvps'])} | "
            f"{n(r['n_grads'])} | {r['upper'][-1]:.4f} | {r['F'][-1]:.4f} | {r['acc'][-1]:.4f} |"
        )
        lines.append(row + (cleaning_extra(P, r["x"]) if extra else ""))
    return lines


def trajectory_table(runs: list[dict]) -> list[str]:
    lines = ["| method | (wall s, F(x)) at the checkpoints |", "|---|---|"]
    for r in runs:
        pts = ", ".join(f"({s:.1f}, {f:.3f})" for s, f in zip(r["seconds"], r["F"], strict=True))
        lines.append(f"| {r['method']} | {pts} |")
    return lines


def references(P: Problem) -> list[str]:
    x0, y0 = P.init()
    if P.name == "cleaning":
        oracle = torch.where(P.flipped, -30.0, 30.0).to(x0)  # type: ignore[arg-type]
        rows = [
            ("uniform weights (train on all, noisy)", x0),
            ("oracle: clean samples only", oracle),
        ]
    else:
        rows = [
            (f"one decay for all blocks, log-decay {v:g}", torch.full_like(x0, v))
            for v in (-2.0, -4.0, -6.0, -8.0)
        ]
    out = ["| reference | F(x) | test acc |", "|---|---|---|"]
    for name, x in rows:
        f, a = score(P, x, y0)
        out.append(f"| {name} | {f:.4f} | {a:.4f} |")
    return out


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (name, runs) in zip(axes, results.items(), strict=True):
        for r in runs:
            ax.plot(r["seconds"], r["F"], marker="o", ms=3, label=r["method"])
        ax.set(title=name, xlabel="wall time (s, one CPU thread)", ylabel="F(x): validation loss")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "results.png", dpi=110)


def main() -> None:
    results, md = {}, []
    for name, make in (("cleaning", cleaning), ("decay", decay)):
        P, cfg = make(), CONFIG[name]
        runs = [hesse_run(P, m, cfg[m], cfg["batch"]) for m in ("bsvr", "lvhba", "implicit")]
        if name == "decay":
            runs.append(influence_run(P, cfg["implicit"]))
        peer = torchopt_run(P, name)
        if peer is not None:
            runs.append(peer)
        results[name] = runs
        md += [
            f"## {name}",
            "",
            *table(P, runs),
            "",
            *trajectory_table(runs),
            "",
            *references(P),
            "",
        ]
        print("\n".join(table(P, runs)), flush=True)
    plot(results)
    header = [
        "# Bilevel benchmark: upper-level objective against wall time",
        "",
        f"`OMP_NUM_THREADS=1 python run.py` on {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, float64, one thread, {time.strftime('%Y-%m-%d')}. "
        "Wall times exclude the checkpoint scoring. F(x) is the validation loss with the "
        "lower level re-solved at x by L-BFGS (the true upper objective); f(x, y) is the "
        "validation loss at the method's own y.",
        "",
        "![F against wall time](results.png)",
        "",
        "Notes. The machine is shared (2 cores, other jobs running): wall times carry tens of "
        "percent of noise between methods. torchopt (0.7.3, in benchmarks/bilevel/.venv) runs "
        "in its own process (peer_torchopt.py) with the same schedule as `implicit`; its first "
        "outer step includes its one-off set-up. `influence.hypergradient` uses "
        "`curvature='ggn'`, which is the exact Hessian for a linear model's cross-entropy. "
        "betty-ml was not run: 0.2.x requires Python < 3.11 (this is 3.11), and 0.1.1's CG "
        "(betty/hypergradient/cg.py) builds the next search direction from the old residual "
        "(`p_new = r + beta * p`), so it is not conjugate gradients.",
        "",
    ]
    path = HERE / "RESULTS.md"
    blocks = path.read_text().partition("## blocks")[1:] if path.exists() else ("", "")
    path.write_text("\n".join(header + md) + "".join(blocks))  # keep blocks.py's section


if __name__ == "__main__":
    main()
