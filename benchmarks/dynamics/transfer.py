"""(2) LR transfer across widths: μP vs standard parametrization (Noci et al. 2024 claim)."""

from __future__ import annotations

import math
import time

import torch
from common import save, table

from hesse.dynamics import SharpnessMonitor
from hesse.dynamics._train import WidthMLP, digits_subset, half_squared_error, train

WIDTHS = (64, 128, 256, 512, 1024)
LRS = tuple(2.0**e for e in range(-3, 5))  # 0.125 .. 16
STEPS = 100
LAST = STEPS - 1 - (STEPS - 1) % 20  # the step of the last sharpness check


def sweep(param: str, x, y) -> dict:
    """Final training loss of every (width, lr); inf when the run diverged."""
    out = {}
    for width in WIDTHS:
        for lr in LRS:
            model = WidthMLP(width, param)
            run = train(model, (x, y), lr=lr, steps=STEPS)
            with torch.no_grad():
                final = float(half_squared_error(model(x), y)) if not run.diverged else math.inf
            out[(width, lr)] = final if math.isfinite(final) else math.inf
    return out


def curves(param: str, lr: float, x, y) -> dict:
    """λmax every 20 steps of GD at one LR, for each width."""
    out = {}
    for width in WIDTHS:
        model = WidthMLP(width, param)
        mon = SharpnessMonitor(model, [(x, y)], half_squared_error, every=20, tol=1e-4)
        run = train(model, (x, y), lr=lr, steps=STEPS, monitor=mon)
        out[width] = {"steps": [r.step for r in mon.history],
                      "lambda_max": [r.lambda_max for r in mon.history],
                      "diverged": run.diverged}  # fmt: skip
    return out


def main() -> None:
    import matplotlib.pyplot as plt

    x, y = digits_subset(256, dtype=torch.float32)
    start, losses, best, sharp = time.perf_counter(), {}, {}, {}
    for param in ("sp", "mup"):
        losses[param] = sweep(param, x, y)
        best[param] = {w: min(LRS, key=lambda lr, w=w: losses[param][(w, lr)]) for w in WIDTHS}
        sharp[param] = curves(param, best[param][WIDTHS[0]] / 2, x, y)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for row, param in enumerate(("sp", "mup")):
        for w in WIDTHS:
            axes[row, 0].loglog(LRS, [losses[param][(w, lr)] for lr in LRS], "o-", label=f"n={w}")
            c = sharp[param][w]
            axes[row, 1].plot(c["steps"], c["lambda_max"], label=f"n={w}")
        axes[row, 0].set(title=f"{param}: loss after {STEPS} GD steps", xlabel="η", ylabel="loss")
        lr_c = best[param][WIDTHS[0]] / 2
        axes[row, 1].set(title=f"{param}: λmax during GD at η = {lr_c:g}", xlabel="step",
                         ylabel="λmax", yscale="log")  # fmt: skip
        axes[row, 0].legend(fontsize=7)
        axes[row, 1].legend(fontsize=7)
    fig.tight_layout()

    def last(p, w):
        c = sharp[p][w]
        return "diverged" if c["diverged"] else c["lambda_max"][-1]

    rows = [[w, best["sp"][w], best["mup"][w], sharp["sp"][w]["lambda_max"][0],
             sharp["mup"][w]["lambda_max"][0], last("sp", w), last("mup", w)]
            for w in WIDTHS]  # fmt: skip
    grid = [[w] + [losses[p][(w, lr)] for lr in LRS] for p in ("sp", "mup") for w in WIDTHS]
    md = "\n\n".join([
        "## (2) Learning-rate transfer across widths: SP vs μP",
        f"Tanh MLP 64-n-n-10 (float32) on 256 unit-norm digits, squared loss, {STEPS} full-batch "
        f"GD steps per run; LR grid {', '.join(f'{lr:g}' for lr in LRS)}. Optimal LR = lowest "
        "final training loss. Sharpness curves at half the width-64 optimum of each "
        "parametrization (λmax every 20 steps, warm-started Lanczos, tol 1e-4).",
        table(["width", "best η (SP)", "best η (μP)", "λmax(0) SP", "λmax(0) μP",
               f"λmax({LAST}) SP", f"λmax({LAST}) μP"],
              rows),
        "Final losses (rows: SP widths, then μP widths; columns: η):",
        table(["width"] + [f"η={lr:g}" for lr in LRS], grid),
        f"Total time {time.perf_counter() - start:.0f} s.",
        "![LR transfer](transfer.png)",
    ])  # fmt: skip
    doc = {
        "widths": WIDTHS,
        "lrs": LRS,
        "best": best,
        "sharpness": sharp,
        "losses": {p: {f"{w},{lr}": v for (w, lr), v in d.items()} for p, d in losses.items()},
    }
    save("transfer", doc, md, {"transfer": fig})
    print(md)


if __name__ == "__main__":
    main()
