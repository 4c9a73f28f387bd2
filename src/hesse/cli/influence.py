"""``hesse influence``: which training points most help and most harm chosen test points.

Data: ``(inputs, targets)`` tensor batches (``--demo``, ``--model``/``--data`` factories, with
``--loss``) or Hugging Face dict batches (``--hf DIR --data train.csv --queries test.csv``,
the model's own loss: sequence classifiers and LMs; a sequence's score is the sum over its
counted tokens, see ``hesse.influence``). Writes ``results.json``, ``report.html``,
``scores.pt`` (the full score matrix and what it is of) and ``top.csv`` (the top training
points per query, with their text for Hugging Face data), each atomically.
"""

from __future__ import annotations

import argparse
import csv
import io
from typing import Any

import torch

from ..influence import IHVP_METHODS, TOKEN_TASKS, InfluenceResult, influence
from ..linalg import eigs
from ..operators import curvature_operator
from ..problem.objective import Objective
from ..report.page import Page, Section, png
from ._influence_samples import Samples, hf_labels, hf_task, hf_tokenizer
from ._inputs import UsageError, parse_params, parse_size
from ._problem import cli_words

SUMMARY = "Influence functions: the training points that most help and harm each test point."
EXAMPLES = """examples:
  hesse influence --demo digits --query 0:10 --top 5 --out influence
  hesse influence --demo digits --query 3,17 --ihvp woodbury --damping 1e-3
  hesse influence --model mymodels:make_net --data mymodels:make_data \\
                  --test-data mymodels:make_test --curvature ggn --damping 1e-3
  hesse influence --hf ./my-bert --data train.csv --queries test.csv --method ekfac \\
                  --damping 1e-3 --top 3 --max-memory 2G
  hesse influence --hf ./my-gpt2 --data train.txt --queries prompts.txt --method ekfac \\
                  --damping 1e-3 --per-token
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
        "--method",
        dest="ihvp",
        choices=IHVP_METHODS,
        default="cg",
        help="inverse: exact (dense), cg, lissa, woodbury (damped empirical "
        "Fisher of the per-sample gradients), kfac or ekfac (Kronecker factors of the GGN, "
        "or of the empirical Fisher with --curvature fisher: the default for --hf language "
        "models, whose exact factors cost a pass per class and token), projected (TRAK/LoGra: the "
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
    group.add_argument(
        "--queries", dest="test_data", metavar="FILE|PKG.MOD:FACTORY",
        help="the query points to explain (as --data; same as --test-data); --query picks "
        "among them",
    )  # fmt: skip
    group.add_argument(
        "--query-rank", type=int, metavar="R",
        help="compress the queries' inverse products to rank R (truncated SVD) before the "
        "training pass (default: exact)",
    )  # fmt: skip
    group.add_argument(
        "--per-token", action="store_true",
        help="also score each training token (token losses: LMs); saved in scores.pt",
    )  # fmt: skip
    group.add_argument(
        "--max-memory", metavar="SIZE",
        help="memory the per-sample gradients, inverse products and scores may hold, e.g. 2G: "
        "gradients are computed in chunks that fit, or the run is refused",
    )  # fmt: skip


def run(args: argparse.Namespace, problem: Any) -> Page:
    """Influence scores of the queries, the top training points, a picture and diagnostics."""
    if problem.loss_fn is not None:
        raise UsageError(
            "hesse influence needs a loss of the model outputs (--loss) or a Hugging Face "
            "model's own loss (--hf); a loss_fn is not supported."
        )
    pool = problem.test_data if problem.test_data is not None else problem.data
    where = "held-out data" if problem.test_data is not None else "training data"
    shown = {"tokenizer": hf_tokenizer(args.hf)} | hf_labels(args, problem.model)
    queries, train = Samples(pool, **shown), Samples(problem.data, **shown)
    if problem.loss is None and not queries.dicts:
        raise UsageError(
            "hesse influence: without --loss the data must be Hugging Face dict batches."
        )
    index = _indices(args.query, queries.n)
    if args.top < 1:
        raise UsageError(f"--top must be >= 1, got {args.top}.")
    dtype, params = DTYPES.get(args.dtype), parse_params(args.params)
    curvature, device = _curvature(args), _device(args.device)
    damping, spectrum = _damping(args, problem, curvature, dtype, params, device)
    settings = {"damping": damping, "curvature": curvature, "params": params, "dtype": dtype}
    settings |= {"device": device}
    result = _influence(args, problem, queries.select(index), settings)
    return _page(problem, result, index, queries, train, args.top, where, spectrum)


def _curvature(args: argparse.Namespace) -> str:
    """The curvature ``--ihvp`` inverts: ``--curvature``, or the method's default.

    Kronecker methods take the GGN's factors, but the empirical Fisher's for ``--hf``
    language models (exact GGN factors cost a backward pass per class and token).
    """
    kronecker = "fisher" if hf_task(args) in TOKEN_TASKS else "ggn"
    defaults = {"woodbury": "fisher", "kfac": kronecker, "ekfac": kronecker, "projected": "fisher"}
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
    return curvature


CLI_WORDS = (
    ("max_memory=", "--max-memory "),
    ("query_rank", "--query-rank"),
    ("per_token=True", "--per-token"),
    ("params=", "--params"),
    ("ihvp='projected'", "--ihvp projected"),
)
"""``influence()`` parameter names in its errors, and the options that set them."""


def _influence(args: argparse.Namespace, problem: Any, queries: list, settings: dict):
    """``hesse.influence`` with the command's options; its option errors exit 2."""
    cap = None if args.max_memory is None else parse_size(args.max_memory)
    try:
        return influence(
            problem.model, problem.data, queries, problem.loss, ihvp=args.ihvp,
            seed=args.seed, max_matvecs=args.budget, progress=args.progress,
            projection_dim=args.projection_dim, query_rank=args.query_rank,
            per_token=args.per_token, max_memory=cap, **settings,
        )  # fmt: skip
    except ValueError as err:
        if any(w in str(err) for w, _ in CLI_WORDS):
            raise UsageError(cli_words(str(err), CLI_WORDS)) from err
        raise


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


def _device(spec: str | None) -> torch.device | None:
    """``--device``, refused up front when this machine does not have it (None: the model's)."""
    if spec is None:
        return None
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise UsageError(f"--device {spec!r}: {err}; pass e.g. cpu, cuda or cuda:1.") from err
    available = getattr(getattr(torch, device.type, None), "is_available", lambda: False)
    if device.type != "cpu" and not available():
        raise UsageError(
            f"--device {spec}: this machine has no {device.type} device "
            f"(torch.{device.type}.is_available() is False); drop --device or pass --device cpu."
        )
    return device


def _damping(args, problem, curvature: str, dtype, params, device) -> tuple[float, dict]:
    """``--damping``, or 1% of λmax plus 1.1·(-λmin) when negative, measured by Lanczos."""
    if args.damping is not None:
        if args.damping < 0:
            raise UsageError(f"--damping must be >= 0, got {args.damping}.")
        return args.damping, {}
    obj = Objective(
        problem.model, problem.data, problem.loss, params=params, dtype=dtype, device=device
    )
    op = curvature_operator(obj, curvature)
    top = float(eigs(op, k=1, tol=1e-3, seed=args.seed).values[0])
    low = 0.0
    if "psd" not in op.tags:
        low = float(eigs(op, k=1, which="smallest", tol=1e-3, seed=args.seed).values[0])
    damping = 0.01 * abs(top) + 1.1 * max(0.0, -low)
    return damping, {"lam_max": top, "lam_min": low, "auto_damping": damping}


def _page(problem, r: InfluenceResult, index, queries: Samples, train: Samples, k: int, where: str,
          spectrum) -> Page:  # fmt: skip
    rows, doc_rows = [], []
    for q, i in enumerate(index.tolist()):
        top = r.top(q, k)
        helpful, harmful = top.helpful.tolist(), top.harmful.tolist()
        shown = f"{i} {queries.text(i)!r}" if queries.dicts else i
        rows.append(
            [shown, queries.label(i), float(r.query_losses[q]), _pairs(helpful, train),
             _pairs(harmful, train)]
        )  # fmt: skip
        doc_rows.append(
            {
                "query": i,
                "label": queries.label(i),
                "loss": float(r.query_losses[q]),
                "helpful": helpful,
                "helpful_scores": top.helpful_scores.tolist(),
                "harmful": harmful,
                "harmful_scores": top.harmful_scores.tolist(),
            }
            | ({"text": queries.text(i)} if queries.dicts else {})
        )
    diag = r.to_dict() | spectrum
    figures = {
        "scores.pt": _scores_file(r, index),
        "top.csv": _top_csv(r, index, queries, train, k),
    }
    if train.images():
        figures["influential.png"] = _picture(r, index, queries, train, k)
    what = "index 'text':label" if train.dicts else "index:label"
    sections = [
        Section(
            f"Most helpful and harmful training points ({where} queries)",
            "score[q, i] = predicted change of query q's loss when training point i is removed "
            "and the model retrained: (w_i/W) ∇L_q^T (H + λI)^-1 ∇ℓ_i, w_i/W the point's weight "
            f"in the mean loss (1/n for a plain mean, n = {r.scores.shape[1]}; counted tokens "
            "over all counted tokens for token losses). Helpful: removing it raises the "
            f"query's loss. Entries are {what}; scores.pt holds every score, top.csv these.",
            ("query", "label", "loss", f"top {k} helpful", f"top {k} harmful"),
            rows,
            "influential.png" if "influential.png" in figures else None,
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


def _scores_file(r: InfluenceResult, index: torch.Tensor) -> bytes:
    """``scores.pt``: the score matrix, its rows' query indices, weights and losses."""
    out = {
        "scores": r.scores,
        "query_indices": index,
        "train_weights": r.train_weights,
        "train_losses": r.train_losses,
        "query_losses": r.query_losses,
        "token_scores": r.token_scores,
        "info": r.to_dict(),
    }
    buffer = io.BytesIO()
    torch.save(out, buffer)
    return buffer.getvalue()


def _top_csv(r: InfluenceResult, index, queries: Samples, train: Samples, k: int) -> bytes:
    """``top.csv``: one row per query, kind (helpful/harmful), rank and training point.

    With token scores, ``top_tokens`` lists the training row's 3 tokens that push its score
    most in the row's direction, as ``token@position:score``.
    """
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["query", "query_text", "kind", "rank", "train_index", "score", "train_label",
                "train_text", "top_tokens"])  # fmt: skip
    for q, i in enumerate(index.tolist()):
        top = r.top(q, k)
        for kind, idx, vals in (
            ("helpful", top.helpful, top.helpful_scores),
            ("harmful", top.harmful, top.harmful_scores),
        ):
            for rank, (j, v) in enumerate(zip(idx.tolist(), vals.tolist(), strict=True), 1):
                tokens = _top_tokens(r, q, j, train, 1 if kind == "helpful" else -1)
                w.writerow([i, queries.text(i), kind, rank, j, repr(v), train.label(j),
                            train.text(j), tokens])  # fmt: skip
    return out.getvalue().encode("utf-8")


def _top_tokens(r: InfluenceResult, q: int, j: int, train: Samples, sign: int) -> str:
    """The 3 tokens of training row ``j`` with the largest ``sign * token score`` for query q."""
    if r.token_scores is None or not train.dicts:
        return ""
    row = sign * r.token_scores[q, j]
    best = torch.topk(row, min(3, row.numel())).indices.tolist()
    words = train.tokens(j, best)
    return " ".join(
        f"{word}@{t}:{float(r.token_scores[q, j, t]):.3g}"
        for word, t in zip(words, best, strict=True)
        if row[t] > 0
    )


def _pairs(indices: list[int], train: Samples) -> str:
    if train.dicts:
        return " ".join(f"{i} {train.text(i)!r}:{train.label(i)}" for i in indices)
    return " ".join(f"{i}:{train.label(i)}" for i in indices)


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


def _picture(r, index, queries: Samples, train: Samples, k: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_q = len(index)
    fig, axes = plt.subplots(
        n_q, 1 + 2 * k, figsize=(1.1 * (1 + 2 * k), 1.3 * n_q + 0.3), squeeze=False
    )
    for q, i in enumerate(index.tolist()):
        top = r.top(q, k)
        cells = [(queries.x[i], f"query {i}\nlabel {queries.label(i)}", "black")]
        cells += [
            (train.x[j], f"+{float(s):.2g}\nlabel {train.label(j)}", "tab:green")
            for j, s in zip(top.helpful.tolist(), top.helpful_scores, strict=True)
        ]
        cells += [
            (train.x[j], f"{float(s):.2g}\nlabel {train.label(j)}", "tab:red")
            for j, s in zip(top.harmful.tolist(), top.harmful_scores, strict=True)
        ]
        for ax, (point, title, color) in zip(axes[q], cells, strict=True):
            img = point.detach().float().cpu().numpy()
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
