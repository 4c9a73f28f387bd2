"""Edge of stability: full-batch GD drives the sharpness up to 2/η and keeps it there.

Trains a small tanh MLP on scikit-learn digits with the squared loss (Cohen et al. 2021's
setting) at a few learning rates, with a ``SharpnessMonitor`` in the loop, and plots
λmax against the step with the 2/η lines ((2 + 2β)/η with heavy-ball momentum).

    python examples/edge_of_stability.py            # about a minute on one CPU thread
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from hesse.dynamics import SharpnessMonitor
from hesse.dynamics._plots import edge_summary, sharpness_figure
from hesse.dynamics._train import digits_subset, eos_model, half_squared_error

RUNS = {"η = 0.4": (0.4, 0.0), "η = 0.2": (0.2, 0.0), "η = 0.5, β = 0.5": (0.5, 0.5)}


def run(lr: float, momentum: float, steps: int, every: int, samples: int) -> tuple:
    """Train once; return the monitor's history and the per-step losses."""
    x, y = digits_subset(samples)
    model = eos_model(32).double()
    monitor = SharpnessMonitor(model, [(x, y)], half_squared_error, every=every)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    losses = []
    for step in range(steps):
        monitor.step(step, lr=lr, momentum=momentum)  # the only line a training loop adds
        loss = half_squared_error(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return monitor.history, losses


def main(steps: int = 3000, every: int = 50, samples: int = 256, out: str | Path = ".") -> dict:
    """Run every setting of ``RUNS``; write ``edge_of_stability.png``; return the summaries."""
    histories, losses, summary = {}, {}, {}
    for label, (lr, beta) in RUNS.items():
        histories[label], losses[label] = run(lr, beta, steps, every, samples)
        summary[label] = edge_summary(histories[label])
        print(f"{label}: λmax / threshold over the last half = {summary[label]['mean_ratio']:.3f}")
    fig = sharpness_figure(histories, losses=losses)
    fig.savefig(Path(out) / "edge_of_stability.png", dpi=110)
    return summary


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(out=sys.argv[1] if len(sys.argv) > 1 else ".")
