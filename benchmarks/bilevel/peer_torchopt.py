"""torchopt's implicit differentiation (custom_root + CG) on the two bilevel problems.

Runs in benchmarks/bilevel/.venv (torch 2.13.0 + torchopt 0.7.3; hesse is not imported), with
the same schedule as ``hesse.bilevel.solve(method="implicit")``: ``inner`` warm-started gradient
steps on the lower level, then the hypergradient from torchopt's implicit function theorem with
``torchopt.linear_solve.solve_cg`` (``maxiter`` products, relative tolerance ``rtol``).
Writes .cache/torchopt.json: per problem the trajectory (steps, seconds, upper at the current
``y``) and the checkpoints ``(step, x, y)`` for run.py to re-solve and score.

Usage: OMP_NUM_THREADS=1 .venv/bin/python peer_torchopt.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torchopt
from problems import cleaning, decay
from run_config import CONFIG

torch.set_num_threads(1)
CACHE = Path(__file__).parent / ".cache"


def run(P, cfg: dict) -> dict:
    x, y = P.init()
    x = x + cfg.get("x_shift", 0.0)
    lr, inner_lr, inner, steps = cfg["lr"], cfg["inner_lr"], cfg["inner_steps"], cfg["steps"]

    def optimality(y_opt, x_):
        return torch.func.grad(lambda yy: P.lower(x_, yy, None))(y_opt)

    solve = torchopt.linear_solve.solve_cg(maxiter=cfg["max_matvecs"], rtol=cfg["tol"])

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def inner_solver(y0, x_):
        y_ = y0.detach().clone().requires_grad_(True)
        with torch.enable_grad():  # torchopt runs the solver inside an autograd.Function
            for _k in range(inner):
                (g,) = torch.autograd.grad(P.lower(x_.detach(), y_, None), y_)
                y_ = (y_ - inner_lr * g).detach().requires_grad_(True)
        return y_.detach()

    seconds, rows, checkpoints = 0.0, [], []
    every = max(1, steps // cfg["checkpoints"])
    for t in range(steps + 1):
        if t % every == 0 or t == steps:
            with torch.no_grad():
                rows.append((t, seconds, float(P.upper(x, y, None))))
            checkpoints.append((t, x.tolist(), y.tolist()))
        if t == steps:
            break
        tick = time.perf_counter()
        x_ = x.detach().requires_grad_(True)
        y_star = inner_solver(y, x_)
        (hg,) = torch.autograd.grad(P.upper(x_, y_star, None), x_)
        x, y = (x - lr * hg).detach(), y_star.detach()
        seconds += time.perf_counter() - tick
    return {"rows": rows, "checkpoints": checkpoints}


def main() -> None:
    CACHE.mkdir(exist_ok=True)
    out = {}
    for name, make in (("cleaning", cleaning), ("decay", decay)):
        out[name] = run(make(), CONFIG[name]["implicit"] | {"checkpoints": CONFIG["checkpoints"]})
        print(name, "done", out[name]["rows"][-1])
    (CACHE / "torchopt.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
