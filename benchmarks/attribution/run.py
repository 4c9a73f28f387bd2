r"""Attribution scored against retraining: hesse vs kronfluence, TRAK and dattri, LDS and AUC.

    OMP_NUM_THREADS=1 benchmarks/attribution/.venv/bin/python benchmarks/attribution/truth.py
    OMP_NUM_THREADS=1 benchmarks/attribution/.venv/bin/python benchmarks/attribution/run.py \\
        [--only mlp-digits cnn-digits tiny-lm] [--skip-auc]

Writes one ``.cache/<workload>-rows.json`` per workload (so workloads can run one by one), and
``report.py`` turns them into RESULTS.md. Every method is run at its documented default
damping and at each value of a grid; "tuned" is the grid value with the best LDS, chosen ON
the ground truth for every method alike (an oracle: it says what each method can reach).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import methods as M  # noqa: E402
import peers as PE  # noqa: E402
import truth as T  # noqa: E402
import workloads as W  # noqa: E402

from hesse.influence import lds, mislabel_auc  # noqa: E402

GRID = (1e-4, 1e-3, 1e-2, 1e-1)
TRAK_GRID = (1e-2, 1e-1, 1.0, 10.0)  # traker/dattri-TRAK add it to the UNnormalized X^T X
SLOW = {"exact": (0.001, 0.01), "cg": (0.001, 0.01), "lissa": (0.001,)}
"""Methods that cost minutes: two grid values only."""
SKIP = {"tiny-lm": {"exact", "cg", "lissa", "projected-ggn"}}
"""Not run there: thousands of data passes each on one shared core (the LM's d = 6.5k)."""
ONE_DAMPING = {"cnn-digits"}
"""Where the slow methods run at the model's weight decay only."""


def _cached(w, tool, method, damping) -> Path:
    folder = M.CACHE / "rows" / w.name
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{tool}-{method}-{damping}.json"


def _row(w, truth, tool, method, damping, default, fn, sign=1.0) -> dict:
    path = _cached(w, tool, method, damping)
    if path.exists():
        return json.loads(path.read_text())
    row = {"tool": tool, "method": method, "damping": damping, "default": default}
    try:
        scores, seconds = fn()[:2]
        if not torch.isfinite(scores).all():
            raise ValueError("non-finite scores")
        r = lds(sign * scores, truth.subsets, truth.outputs, output=w.output)
        row |= {"lds": r.score.value, "low": r.score.low, "high": r.score.high,
                "seconds": seconds, "valid": r.n_valid}  # fmt: skip
    except Exception as err:  # a peer that fails is reported, not hidden
        row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        traceback.print_exc(limit=2)
    print(json.dumps(row), flush=True)
    path.write_text(json.dumps(row))
    return row


def hesse_rows(w, truth, slow: bool) -> list[dict]:
    """The cheap methods (``slow=False``) or those in ``SLOW``."""
    rows = []
    for method in M.HESSE:
        if method in SKIP.get(w.name, ()) or (method in SLOW) != slow:
            continue
        grid = SLOW.get(method, GRID)
        if method in SLOW and w.name in ONE_DAMPING:
            grid = (w.wd,)
        for lam in grid:
            fn = lambda lam=lam, method=method: M.hesse_scores(w, method, lam)  # noqa: E731
            rows.append(_row(w, truth, "hesse", method, lam, lam == w.wd, fn))
    return rows


def peer_rows(w, truth, models) -> list[dict]:
    rows, model = [], models[0]
    # kronfluence scores the margin's (or LM loss's) gradient: its sign is hesse's for the
    # loss measurement, the opposite for the margin (see hesse.influence's docstring)
    ksign = 1.0 if w.output == "loss" else -1.0
    for lam in (1e-8, None, 1e-3, 1e-2):
        fn = lambda lam=lam: PE.kronfluence_scores(w, model, damping=lam)  # noqa: E731
        rows.append(_row(w, truth, "kronfluence", "ekfac", lam, lam == 1e-8, fn, ksign))
    for method in PE.DATTRI:
        if method == "explicit" and w.name != "mlp-digits":
            continue  # torch.func.hessian of d = 3.7k / 6.5k parameters: too slow here
        grid = {
            "tracin": (None,),
            "lissa": (None,),
            "arnoldi": (None,),
            "trak": (None, 1.0, 10.0, 100.0),
        }
        grid = grid.get(method, (None, 1e-3, 1e-2))
        if method == "cg" and w.name == "tiny-lm":
            grid = (None,)  # 130 s each on the shared core
        for lam in grid:
            fn = lambda lam=lam, method=method: PE.dattri_scores(w, [model], method, damping=lam)  # noqa: E731
            rows.append(_row(w, truth, "dattri", method, lam, lam is None, fn, dattri_sign(w)))
    return rows


def trak_rows(w, truth, models) -> list[dict]:
    """Traker at its default (lambda 0) and a grid, one and three checkpoints."""
    rows = []
    # TRAK's score is the predicted INCREASE of the output (margin, log-likelihood) from
    # including a point: hesse's sign for margins; for the LM output (minus the loss) too
    settings = (
        (0.0, 1),
        (0.1, 1),
        (1.0, 1),
        (10.0, 1),
        (100.0, 1),
        (0.0, 3),
        (10.0, 3),
        (100.0, 3),
    )
    for lam, ens in settings:
        fn = lambda lam=lam, ens=ens: PE.trak_scores(w, models[:ens], lambda_reg=lam)  # noqa: E731
        rows.append(_row(w, truth, "traker", f"trak-ens{ens}", lam, lam == 0.0, fn))
    return rows


def dattri_sign(w) -> float:
    """Sign of dattri: g_train^T H^-1 g_test of the loss: positive = helpful, hesse's sign."""
    return 1.0


def auc_rows(w) -> list[dict]:
    """Mislabel detection: 10% of the labels flipped, self-influence of each training point."""
    g = torch.Generator().manual_seed(7)
    flipped = torch.zeros(len(w.y), dtype=torch.bool)
    flipped[torch.randperm(len(w.y), generator=g)[: len(w.y) // 10]] = True
    y = w.y.clone()
    y[flipped] = (
        y[flipped] + torch.randint(1, w.classes, (int(flipped.sum()),), generator=g)
    ) % w.classes
    noisy = W.Workload(**{**w.__dict__, "y": y, "xq": w.x, "yq": y, "name": w.name + "-flip"})
    model = M.trained(noisy, 0)
    rows = []

    def add(tool, method, damping, fn, sign=1.0):
        path = _cached(noisy, tool, method, damping)
        if path.exists():
            rows.append(json.loads(path.read_text()))
            return
        row = {"tool": tool, "method": method, "damping": damping}
        try:
            start = time.perf_counter()
            s = fn()
            s = s.diagonal() if s.dim() == 2 and s.shape[0] == s.shape[1] else s.flatten()
            a = mislabel_auc(sign * s, flipped)
            row |= {
                "auc": a.value,
                "low": a.low,
                "high": a.high,
                "seconds": time.perf_counter() - start,
            }
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        print(json.dumps(row), flush=True)
        path.write_text(json.dumps(row))
        rows.append(row)

    hesse = ("exact", "woodbury", "kfac", "ekfac", "projected", "projected-ggn")
    for method in hesse[1:] if w.name in ONE_DAMPING else hesse:  # the CNN's dense GGN: >10 min
        for lam in (1e-3, 1e-2):
            add(
                "hesse",
                method,
                lam,
                lambda method=method, lam=lam: M.hesse_scores(noisy, method, lam)[0],
            )
    add(
        "kronfluence",
        "ekfac",
        1e-8,
        lambda: PE.kronfluence_scores(noisy, model, self_scores=True)[0],
    )
    add(
        "kronfluence",
        "ekfac",
        None,
        lambda: PE.kronfluence_scores(noisy, model, damping=None, self_scores=True)[0],
    )
    for lam in (0.0, 1.0):
        add(
            "traker",
            "trak-ens1",
            lam,
            lambda lam=lam: PE.trak_scores(noisy, [model], lambda_reg=lam)[0],
        )
    for method, lam in (
        ("tracin", None),
        ("trak", None),
        ("trak", 1.0),
        ("ekfac", 1e-2),
        ("cg", 1e-2),
    ):
        add(
            "dattri",
            method,
            lam,
            lambda method=method, lam=lam: PE.dattri_scores(noisy, [model], method, damping=lam)[0],
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=list(W.WORKLOADS))
    parser.add_argument("--skip-auc", action="store_true")
    parser.add_argument("--skip-peers", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in args.only:
        w = W.WORKLOADS[name]()
        truth = T.truth(w, 100, progress=False)
        models = [M.trained(w, s) for s in range(3)]
        out = {"workload": name, "n_train": len(w.x), "n_query": len(w.xq),
               "subsets": truth.outputs.shape[0], "alpha": truth.alpha,
               "params": sum(p.numel() for p in models[0].parameters())}  # fmt: skip
        (M.CACHE / "rows" / f"{name}-meta.json").write_text(json.dumps(out))
        rows = hesse_rows(w, truth, slow=False)
        rows += [] if args.skip_peers else peer_rows(w, truth, models)
        if not args.skip_auc and w.output == "margin":
            out["auc"] = auc_rows(w)
        rows += [] if args.skip_peers else trak_rows(w, truth, models)
        out["rows"] = rows + hesse_rows(w, truth, slow=True)
        (M.CACHE / f"{name}-rows.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
