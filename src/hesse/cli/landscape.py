"""``hesse landscape``: the loss around the weights in 1D or 2D, with LLA's spectral criteria."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..dynamics import Landscape, grid_losses, landscape, spectral_criteria
from ..problem.objective import Objective
from ..report.page import Page, Section, png
from ._inputs import UsageError, parse_params

SUMMARY = "Loss landscape around the weights (1D/2D, filter-normalized or Hessian axes)."
EXAMPLES = """examples:
  hesse landscape --demo digits
  hesse landscape --demo digits --directions hessian --span 0.5 --dims 2 --steps 21
  hesse landscape --model mymodels:make_net --data mymodels:make_data --criteria
"""
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def add_arguments(group: Any) -> None:
    """The options of ``hesse landscape``."""
    group.add_argument("--directions", choices=["filter", "hessian", "random"], default="filter",
                       help="filter-normalized Gaussian (Li et al. 2018), top Hessian "
                       "eigenvectors, or isotropic Gaussian (default filter)")  # fmt: skip
    group.add_argument("--dims", type=int, choices=[1, 2], default=1, help="1D curve or 2D grid")
    group.add_argument("--span", type=float, default=1.0, help="half-width of the grid")
    group.add_argument(
        "--steps", type=int, help="grid points per axis (default 41 in 1D, 21 in 2D)"
    )
    group.add_argument("--criteria", action="store_true",
                       help="also compute LLA's spectral criteria (λmax/λk, negative share, "
                       "Tr/λmax)")  # fmt: skip


def run(args: argparse.Namespace, problem: Any) -> Page:
    """Evaluate the landscape of the problem's training loss (and held-out loss, if any)."""
    steps = args.steps or (41 if args.dims == 1 else 21)
    if steps < 3 or steps % 2 == 0:
        raise UsageError(f"--steps must be odd and >= 3 (a point at the weights), got {steps}.")
    obj = _objective(args, problem, problem.data)
    ls = landscape(obj, args.directions, span=args.span, steps=steps, dims=args.dims,
                   seed=args.seed)  # fmt: skip
    test = None
    if problem.test_data is not None:
        held = _objective(args, problem, problem.test_data)
        coords = torch.stack([g.reshape(-1) for g in _grid(ls)], 1)
        test = grid_losses(held, ls.directions, coords, 8).reshape(ls.values.shape)
    crit = spectral_criteria(obj, seed=args.seed) if args.criteria else None
    return _page(problem, ls, test, crit)


def _objective(args: argparse.Namespace, problem: Any, data: Any) -> Objective:
    return Objective(
        problem.model, data, problem.loss, loss_fn=problem.loss_fn,
        params=parse_params(args.params), dtype=DTYPES.get(args.dtype), device=args.device,
    )  # fmt: skip


def _grid(ls: Landscape) -> tuple[torch.Tensor, ...]:
    return torch.meshgrid(*ls.axes, indexing="ij")


def _page(problem: Any, ls: Landscape, test: torch.Tensor | None, crit: Any) -> Page:
    import matplotlib.pyplot as plt

    dims = ls.values.dim()
    fig = ls.plot(title=f"{problem.name}: {ls.kind} directions")
    if test is not None and dims == 1:
        fig.axes[0].plot(ls.axes[0].numpy(), test.numpy(), label="held-out")
        fig.axes[0].lines[0].set_label("training")
        fig.axes[0].legend()
    figure = png(fig)
    plt.close(fig)
    curv = [ls.curvature_along(a) for a in range(dims)]
    rows = [["loss at the weights", ls.center], ["grid points (forward passes)", ls.n_evaluations],
            ["seconds", ls.seconds], ["max loss on the grid", float(ls.values.max())]]  # fmt: skip
    if test is not None:  # the middle of an odd grid, flattened, is its centre in 1D and 2D
        rows.append(["held-out loss at the weights", float(test.reshape(-1)[test.numel() // 2])])
    rows += [[f"second difference at 0 along axis {a + 1}", c] for a, c in enumerate(curv)]
    if ls.eigenvalues is not None:
        rows += [[f"Hessian eigenvalue {i + 1}", float(v)] for i, v in enumerate(ls.eigenvalues)]
    doc = {
        "kind": ls.kind, "dims": dims, "axes": [a.tolist() for a in ls.axes],
        "values": ls.values.tolist(), "test_values": None if test is None else test.tolist(),
        "center": ls.center, "curvature_along": curv, "n_evaluations": ls.n_evaluations,
        "seconds": ls.seconds,
        "eigenvalues": None if ls.eigenvalues is None else ls.eigenvalues.tolist(),
        "criteria": None if crit is None else crit.as_dict(),
    }  # fmt: skip
    text = _conventions(ls.kind)
    sections = [Section("Landscape", text, ("quantity", "value"), rows, "landscape.png")]
    if crit is not None:
        crows = [["λmax / λk", crit.ratio, f"k = {crit.k}; " + crit.definitions["ratio"]],
                 ["negative share", crit.negative_share, crit.definitions["negative_share"]],
                 ["Tr(H) / λmax", crit.trace_ratio, crit.definitions["trace_ratio"]]]  # fmt: skip
        sections.append(Section("Spectral criteria (LLA)", "", ("criterion", "value",
                                 "definition"), crows))  # fmt: skip
    return Page(f"hesse landscape: {problem.name}", doc, sections, {"landscape.png": figure})


def _conventions(kind: str) -> str:
    if kind == "filter":
        return (
            "Filter-normalized Gaussian directions (Li et al. 2018): each filter of the "
            "direction has the norm of the same filter of the weights; biases and "
            "normalization weights are not perturbed. Batch-norm layers use their running "
            "statistics (eval mode), as LLA recommends."
        )
    if kind == "hessian":
        return "Unit eigenvectors of the largest Hessian eigenvalues; span is a Euclidean distance."
    return "Isotropic Gaussian directions of unit norm; span is a Euclidean distance."
