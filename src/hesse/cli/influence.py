"""``hesse influence``: which training points most help and most harm chosen test points."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..influence import IHVP_METHODS, InfluenceResult, influence
from ..linalg import eigs
from ..operators import curvature_operator
from ..problem.objective import Objective
from ..report.page import Page, Section, png
from ._inputs import UsageError, parse_params

SUMMARY = "Influence functions: the training points that most help and harm each test point."
EXAMPLES = """examples:
  hesse influence --demo digits --query 0:10 --top 5 --out influence
  hesse influence --demo digits --query 3,17 --ihvp woodbury --damping 1e-3
  hesse influence --model mymodels:make_net --data mymodels:make_data \\
                  --test-data mymodels:make_test --curvature ggn --damping 1e-3
"""
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def add_arguments(group: Any) -> None:
    """The options of ``hesse influence``."""
    group.add_argument(
        "--query",
        default="0:10",
        help="test points to explain: a range START:STOP "
        "or indices 3,17,42 of the held-out data (default 0:10)",
    )
    group.add_argument("--top", type=int, default=5, help="helpful and harmful points per query")
    group.add_argument(
        "--ihvp",
        choices=IHVP_METHODS,
        default="cg",
        help="inverse: exact (dense), cg, lissa, woodbury (damped empirical "
        "Fisher of the per-sample gradients), kfac or ekfac (Kronecker factors of the GGN, "
        "or of the empirical Fisher with --curvature fisher), projected (TRAK/LoGra: the "
        "empirical Fisher, or the GGN with --curvature ggn, in a random subspace of "
        "--projection-dim dimensions); default cg",
    )
    group.add_argument(
        "--projection-dim",
        type=int,
        default=1024,
        help="--ihvp projected: the dimension k gradients are projected to (default 1024)",
    )
    group.add_argument(
        "--damping",
        type=float,
        help="added to the curvature's diagonal "
        "(default: 1%% of its largest eigenvalue, plus 1.1 times minus its "
        "smallest when that is negative; both measured by Lanczos)",
    )


def run(args: argparse.Namespace, problem: Any) -> Page:
    """Influence scores of the queries, the top training points, a picture and diagnostics."""
    if problem.loss_fn is not None or problem.loss is None:
        raise UsageError(
            "hesse influence needs (inputs, targets) batches and a loss of the outputs "
            "(--loss); models with their own loss or a loss_fn are not supported."
        )
    pool = problem.test_data if problem.test_data is not None else problem.data
    where = "held-out data" if problem.test_data is not None else "training data"
    x, y = _cat(pool)
    index = _indices(args.query, len(x))
    if args.top < 1:
        raise UsageError(f"--top must be >= 1, got {args.top}.")
    dtype, params = DTYPES.get(args.dtype), parse_params(args.params)
    defaults = {"woodbury": "fisher", "kfac": "ggn", "ekfac": "ggn", "projected": "fisher"}
    curvature = args.curvature or defaults.get(args.ihvp, "hessian")
    if args.ihvp == "woodbury" and curvature != "fisher":
        raise UsageError(
            "--ihvp woodbury inverts the damped empirical Fisher of the per-sample gradients; "
            "drop --curvature (or pass --curvature fisher), or use --ihvp cg for the "
            f"{curvature}."
        )
    if curvature in ("kfac", "ekfac"):
        raise UsageError(
            f"--curvature {curvature} is not a matrix influence inverts by products; pass "
            f"--ihvp {curvature} (Kronecker factors of the GGN, or of the Fisher with "
            "--curvature fisher)."
        )
    damping, spectrum = _damping(args, problem, curvature, dtype, params)
    result = influence(
        problem.model,
        problem.data,
        [(x[index], y[index])],
        problem.loss,
        ihvp=args.ihvp,
        damping=damping,
        curvature=curvature,
        params=params,
        dtype=dtype,
        seed=args.seed,
        max_matvecs=args.budget,
        progress=args.progress,
        projection_dim=args.projection_dim,
    )
    train_x, train_y = _cat(problem.data)
    return _page(problem, result, index, (x, y), (train_x, train_y), args.top, where, spectrum)


def _cat(batches: Any) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [b for b in batches if isinstance(b, (tuple, list)) and len(b) == 2]
    if not pairs or len(pairs) != len(batches):
        raise UsageError("hesse influence needs data as (inputs, targets) batches of tensors.")
    return torch.cat([b[0] for b in pairs]), torch.cat([b[1] for b in pairs])


def _indices(spec: str, n: int) -> torch.Tensor:
    """``START:STOP`` or ``i,j,k`` as indices into ``n`` points."""
    try:
        if ":" in spec:
            start, _, stop = spec.partition(":")
            chosen = list(range(n))[slice(int(start or 0), int(stop) if stop else None)]
        else:
            chosen = [int(i) for i in spec.split(",") if i.strip()]
    except ValueError:
        chosen = None
    if not chosen or any(not 0 <= i < n for i in chosen):
        raise UsageError(
            f"--query {spec!r}: give a range START:STOP or indices i,j,k within the {n} query "
            "candidates (e.g. 0:10)."
        )
    return torch.tensor(chosen)


def _damping(args, problem, curvature: str, dtype, params) -> tuple[float, dict]:
    """``--damping``, or 1% of λmax plus 1.1·(-λmin) when negative, measured by Lanczos."""
    if args.damping is not None:
        if args.damping < 0:
            raise UsageError(f"--damping must be >= 0, got {args.damping}.")
        return args.damping, {}
    obj = Objective(problem.model, problem.data, problem.loss, params=params, dtype=dtype)
    op = curvature_operator(obj, curvature)
    top = float(eigs(op, k=1, tol=1e-3, seed=args.seed).values[0])
    low = 0.0
    if "psd" not in op.tags:
        low = float(eigs(op, k=1, which="smallest", tol=1e-3, seed=args.seed).values[0])
    damping = 0.01 * abs(top) + 1.1 * max(0.0, -low)
    return damping, {"lam_max": top, "lam_min": low, "auto_damping": damping}


def _page(problem, r: InfluenceResult, index, queries, train, k: int, where: str, spectrum) -> Page:
    (x, y), (tx, ty) = queries, train
    rows, doc_rows = [], []
    for q, i in enumerate(index.tolist()):
        top = r.top(q, k)
        helpful, harmful = top.helpful.tolist(), top.harmful.tolist()
        rows.append(
            [i, _label(y[i]), float(r.query_losses[q]), _pairs(helpful, ty), _pairs(harmful, ty)]
        )
        doc_rows.append(
            {
                "query": i,
                "label": _label(y[i]),
                "loss": float(r.query_losses[q]),
                "helpful": helpful,
                "helpful_scores": top.helpful_scores.tolist(),
                "harmful": harmful,
                "harmful_scores": top.harmful_scores.tolist(),
            }
        )
    diag = r.to_dict() | spectrum
    figures = {} if not _images(tx) else {"influential.png": _picture(r, index, x, y, tx, ty, k)}
    sections = [
        Section(
            f"Most helpful and harmful training points ({where} queries)",
            "score[q, i] = predicted change of query q's loss when training point i is removed "
            "and the model retrained: (w_i/W) ∇L_q^T (H + λI)^-1 ∇ℓ_i, w_i/W the point's weight "
            f"in the mean loss (1/n for a plain mean, n = {r.scores.shape[1]}). "
            "Helpful: removing it raises the query's loss. Entries are index:label.",
            ("query", "label", "loss", f"top {k} helpful", f"top {k} harmful"),
            rows,
            "influential.png" if figures else None,
        ),
        Section("Diagnostics", _words(r, spectrum), ("item", "value"), _diag_rows(r)),
    ]
    doc = {
        "influence": diag,
        "queries": doc_rows,
        "query_indices": index.tolist(),
        "scores": r.scores.tolist(),
    }
    return Page(f"hesse influence: {problem.name}", doc, sections, figures)


def _label(t: torch.Tensor) -> Any:
    return int(t) if t.numel() == 1 and not t.is_floating_point() else t.tolist()


def _pairs(indices: list[int], targets: torch.Tensor) -> str:
    return " ".join(f"{i}:{_label(targets[i])}" for i in indices)


def _words(r: InfluenceResult, spectrum: dict) -> str:
    auto = (
        f" Damping chosen from the measured spectrum (λmax {spectrum['lam_max']:.4g}, λmin "
        f"{spectrum['lam_min']:.4g})."
        if spectrum
        else ""
    )
    return (
        f"{r.ihvp} inverse of the {r.curvature} + {r.inverse.damping:.3g}·I; "
        f"‖∇L_train‖ = {r.gradient_norm:.3g} (influence assumes a minimum).{auto}"
    )


def _diag_rows(r: InfluenceResult) -> list[list]:
    d = r.inverse
    rows = [
        ["converged", d.converged],
        ["curvature products", d.n_matvecs],
        ["largest relative residual", float(d.residuals.max())],
        ["seconds", r.seconds],
    ]
    rows += [[f"LiSSA {k}", v] for k, v in (("scale", d.scale), ("depth", d.depth)) if v]
    rows += [[f"memory {k} (bytes)", v] for k, v in r.memory.items()]
    return rows


def _images(x: torch.Tensor) -> bool:
    shape = tuple(x.shape[1:])
    return len(shape) == 2 or (len(shape) == 3 and shape[0] in (1, 3))


def _picture(r, index, x, y, tx, ty, k: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_q = len(index)
    fig, axes = plt.subplots(
        n_q, 1 + 2 * k, figsize=(1.1 * (1 + 2 * k), 1.3 * n_q + 0.3), squeeze=False
    )
    for q, i in enumerate(index.tolist()):
        top = r.top(q, k)
        cells = [(x[i], f"query {i}\nlabel {_label(y[i])}", "black")]
        cells += [
            (tx[j], f"+{float(s):.2g}\nlabel {_label(ty[j])}", "tab:green")
            for j, s in zip(top.helpful.tolist(), top.helpful_scores, strict=True)
        ]
        cells += [
            (tx[j], f"{float(s):.2g}\nlabel {_label(ty[j])}", "tab:red")
            for j, s in zip(top.harmful.tolist(), top.harmful_scores, strict=True)
        ]
        for ax, (img, title, color) in zip(axes[q], cells, strict=True):
            img = img.detach().float().cpu().numpy()
            ax.imshow(
                img.transpose(1, 2, 0)
                if img.ndim == 3 and img.shape[0] == 3
                else img.reshape(img.shape[-2:]),
                cmap="gray_r",
            )
            ax.set_title(title, fontsize=6, color=color)
            ax.axis("off")
    fig.suptitle(f"query | {k} most helpful (green) | {k} most harmful (red)", fontsize=8, y=1.0)
    fig.tight_layout()
    out = png(fig)
    plt.close(fig)
    return out
