"""``hesse train-demo``: full-batch GD on a built-in MLP, watching the edge of stability."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, cast

import torch

from ..dynamics import SharpnessMonitor, edge_summary, gd_threshold, sharpness_figure
from ..dynamics._train import digits_subset, eos_model, half_squared_error, train
from ..report.page import Page, Section, png
from ._inputs import UsageError

SUMMARY = "Train a small MLP with full-batch GD and watch λmax rise to 2/η (edge of stability)."
EXAMPLES = """examples:
  hesse train-demo --optimizer sgd --lr 0.4 --monitor
  hesse train-demo --lr 0.13 --steps 3000 --every 25 --monitor --out eos
  hesse train-demo --lr 0.25 --momentum 0.9 --monitor   # threshold (2 + 2β)/η
"""


def add_arguments(group: Any) -> None:
    """The options of ``hesse train-demo`` (the model and data are built in)."""
    group.add_argument(
        "--optimizer", choices=["sgd"], default="sgd",
        help="(S)GD with heavy-ball --momentum; full batch unless --batch-size",
    )  # fmt: skip
    group.add_argument("--lr", type=float, default=0.4, help="learning rate η (default 0.4)")
    group.add_argument("--momentum", type=float, default=0.0, help="heavy-ball β (default 0)")
    group.add_argument("--steps", type=int, default=2000, help="training steps (default 2000)")
    group.add_argument(
        "--monitor", action="store_true",
        help="track λmax with warm-started Lanczos (else only at the start and the end)",
    )  # fmt: skip
    group.add_argument("--every", type=int, default=20, help="steps between checks (default 20)")
    group.add_argument("--width", type=int, default=32, help="hidden width (default 32)")


def run(args: argparse.Namespace, problem: Any = None) -> Page:
    """Train the built-in problem and return the edge-of-stability page.

    The problem is fixed, whatever the source options say: ``--samples`` (default 256)
    scikit-learn digits (unit-norm images), a ``64 -> w -> w -> 10`` tanh MLP in float64, the
    squared loss ``0.5 ||f(x) - y||^2`` on one-hot targets (Cohen et al. 2021's setting), and
    full-batch GD (mini-batch SGD with ``--batch-size``).
    """
    if not args.lr > 0:
        raise UsageError(f"--lr must be positive (the step of gradient descent), got {args.lr}.")
    torch.manual_seed(args.seed)
    data = digits_subset(args.samples or 256, seed=args.seed)
    model = eos_model(args.width, seed=args.seed).double()
    every = args.every if args.monitor else args.steps
    mon = SharpnessMonitor(model, [data], half_squared_error, every=every,
                           budget=args.budget, seed=args.seed)  # fmt: skip
    result = train(model, data, lr=args.lr, steps=args.steps, momentum=args.momentum,
                   batch_size=args.batch_size, monitor=mon, seed=args.seed)  # fmt: skip
    if not result.diverged:
        mon.measure(args.steps, lr=args.lr, momentum=args.momentum)
    return _page(args, mon, result.losses, result.diverged)


def _page(args: argparse.Namespace, mon: SharpnessMonitor, losses: list, diverged: bool) -> Page:
    import matplotlib.pyplot as plt

    label = f"η = {args.lr:g}" + (f", β = {args.momentum:g}" if args.momentum else "")
    summary = edge_summary(mon.history)
    threshold = gd_threshold(args.lr, args.momentum)  # torch SGD's heavy ball, as train() runs
    text = (
        f"Full-batch GD ({label}) for {args.steps} steps on {len(mon.data[0][0])} digits; "
        f"threshold (2 + 2β)/η = {threshold:.4g}. Over the last half of the checks λmax / "
        f"threshold = {summary['mean_ratio']:.3f} on average (min {summary['min_ratio']:.3f}, "
        f"max {summary['max_ratio']:.3f})." + (" The run diverged." if diverged else "")
    )
    # the monitor ran at args.lr, nonzero (gd_threshold above divides by it): every record
    # has a threshold
    rows = [[r.step, r.loss, r.lambda_max, r.residual, r.threshold,
             r.lambda_max / cast(float, r.threshold), r.n_matvecs]
            for r in mon.history]  # fmt: skip
    fig = sharpness_figure({label: mon.history}, losses={label: losses})
    doc = {
        "settings": {k: getattr(args, k) for k in ("lr", "momentum", "steps", "every", "width")},
        "threshold": threshold,
        "diverged": diverged,
        "edge": summary,
        "history": [dataclasses.asdict(r) for r in mon.history],
        "losses": losses,
    }
    columns = ("step", "loss", "λmax", "residual", "(2+2β)/η", "ratio", "products")
    sections = [
        Section("Edge of stability", text, figure="sharpness.png"),
        Section("Checks", "", columns, rows),
    ]
    figures = {"sharpness.png": png(fig)}
    plt.close(fig)
    return Page("hesse train-demo: sharpness during training", doc, sections, figures)
