"""(1) Edge of stability: full-batch GD at two LRs and with momentum; warm vs cold Lanczos."""

from __future__ import annotations

import time

import torch
from common import save, table

from hesse.dynamics import SharpnessMonitor
from hesse.dynamics._plots import edge_summary, sharpness_figure
from hesse.dynamics._train import digits_subset, eos_model, half_squared_error

RUNS = {  # label: (lr, momentum)
    "η = 0.2": (0.2, 0.0),
    "η = 0.4": (0.4, 0.0),
    "η = 0.6, β = 0.5": (0.6, 0.5),
    "η = 0.38, β = 0.9": (0.38, 0.9),
}


def one(lr: float, beta: float, steps: int, every: int, cold: bool) -> dict:
    x, y = digits_subset(256)
    model = eos_model(32).double()

    def monitor(warm: bool, tol: float) -> SharpnessMonitor:
        return SharpnessMonitor(
            model, [(x, y)], half_squared_error, every=every, warm=warm, tol=tol
        )

    warm, ref = monitor(True, 1e-6), monitor(False, 1e-6)
    loose = (monitor(True, 1e-3), monitor(False, 1e-3))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=beta)
    losses, start = [], time.perf_counter()
    for t in range(steps):
        loss = half_squared_error(model(x), y)
        if not torch.isfinite(loss):
            break
        warm.step(t, lr=lr, momentum=beta)
        if cold:
            for m in (ref, *loose):
                m.step(t, lr=lr, momentum=beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"warm": warm.history, "cold": ref.history, "losses": losses,
            "loose": [m.history for m in loose],
            "seconds": time.perf_counter() - start}  # fmt: skip


def main(steps: int = 4000, every: int = 40) -> None:
    results, rows, prod = {}, [], []
    for label, (lr, beta) in RUNS.items():
        r = one(lr, beta, steps, every, cold=True)
        results[label] = r
        s = edge_summary(r["warm"])
        rows.append([label, (2 + 2 * beta) / lr, s["mean_ratio"], s["min_ratio"], s["max_ratio"],
                     s["max_deviation"] <= 0.05, r["losses"][-1]])  # fmt: skip
        w = [h.n_matvecs for h in r["warm"][1:]]
        c = [h.n_matvecs for h in r["cold"][1:]]
        gap = max(abs(a.lambda_max - b.lambda_max) / b.lambda_max
                  for a, b in zip(r["warm"], r["cold"], strict=True))  # fmt: skip
        lw, lc = ([h.n_matvecs for h in m[1:]] for m in r["loose"])
        prod.append([label, sum(w) / len(w), sum(c) / len(c), sum(c) / sum(w), gap,
                     sum(lw) / len(lw), sum(lc) / len(lc), sum(lc) / sum(lw)])  # fmt: skip
    fig = sharpness_figure({k: v["warm"] for k, v in results.items()},
                           losses={k: v["losses"] for k, v in results.items()})  # fmt: skip
    md = "\n\n".join([
        "## (1) Edge of stability (full-batch GD, squared loss)",
        f"Tanh MLP 64-32-32-10 (float64) on 256 unit-norm digits, loss 0.5‖f(x) − y‖², "
        f"{steps} steps, λmax every {every} steps by warm-started Lanczos (tol 1e-6).",
        "λmax / threshold over the last half of the checks (threshold (2 + 2β)/η):",
        table(["run", "threshold", "mean ratio", "min", "max", "all within 5%", "final loss"],
              rows),
        "Lanczos products per check after the first (warm start from the last check's vector "
        "vs a random start) at the monitor's default tolerance 1e-6 and at 1e-3, and the "
        "largest relative gap between the warm and cold λmax (tol 1e-6):",
        table(["run", "warm", "cold", "cold / warm", "max rel. gap", "warm (1e-3)",
               "cold (1e-3)", "cold / warm (1e-3)"], prod),
        "![edge of stability](eos.png)",
    ])  # fmt: skip
    doc = {k: {"warm": [h.__dict__ for h in v["warm"]],
               "cold_matvecs": [h.n_matvecs for h in v["cold"]],
               "losses": v["losses"][::10], "seconds": v["seconds"]}
           for k, v in results.items()}  # fmt: skip
    save("eos", {"runs": doc, "table": rows, "products": prod}, md, {"eos": fig})
    print(md)


if __name__ == "__main__":
    main()
