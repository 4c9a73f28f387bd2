"""Leave-one-out on the MLP workload, where it is meaningful: float64, warm-started L-BFGS.

    OMP_NUM_THREADS=1 benchmarks/attribution/.venv/bin/python benchmarks/attribution/loo.py

Removing point ``i`` sets its weight to 0 in ``sum_i w_i l_i / n + wd/2 |theta|^2`` (n kept:
hesse's convention), and the model is re-converged from the full model's weights, so the
change of a query's loss is the effect of the removal and not of a new random start (on the
CNN and the LM, trained by Adam from random starts, it would be noise). Writes
``.cache/loo.json``; report.py adds it to RESULTS.md.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy import stats

sys.path.insert(0, str(Path(__file__).parent))
import methods as M  # noqa: E402
import workloads as W  # noqa: E402

from hesse.influence import influence  # noqa: E402

REMOVED = 30


def fit(model, x, y, w, wd):
    """L-BFGS in float64 on the weighted objective, to a gradient norm of ~1e-10."""
    opt = torch.optim.LBFGS(
        model.parameters(), max_iter=2000, history_size=50, line_search_fn="strong_wolfe",
        tolerance_grad=1e-11, tolerance_change=1e-16,
    )  # fmt: skip

    def closure():
        opt.zero_grad()
        value = (w * F.cross_entropy(model(x), y, reduction="none")).sum() / len(y)
        value = value + wd / 2 * sum((p**2).sum() for p in model.parameters())
        value.backward()
        return value

    opt.step(closure)
    return model


def main() -> None:
    torch.set_num_threads(1)
    wl = W.mlp_digits()
    x, y, xq, yq = wl.x.double(), wl.y, wl.xq.double(), wl.yq
    full = fit(M.trained(wl, 0).double(), x, y, torch.ones(len(y), dtype=torch.float64), wl.wd)
    with torch.no_grad():
        before = F.cross_entropy(full(xq), yq, reduction="none")
    removed = torch.randperm(len(y), generator=torch.Generator().manual_seed(3))[:REMOVED]
    actual = []
    for i in removed:
        w = torch.ones(len(y), dtype=torch.float64)
        w[i] = 0.0
        m = fit(copy.deepcopy(full), x, y, w, wl.wd)
        with torch.no_grad():
            actual.append(F.cross_entropy(m(xq), yq, reduction="none") - before)
    actual = torch.stack(actual, 1)  # (n_query, removed)
    out = {"removed": REMOVED, "queries": len(yq), "rows": []}
    train, query = M.batches(x, y), M.batches(xq, yq)
    settings = {
        "exact": {"ihvp": "exact", "curvature": "ggn"},
        "exact-hessian": {"ihvp": "exact", "curvature": "hessian"},
        "woodbury": {"ihvp": "woodbury"},
        "ekfac": {"ihvp": "ekfac"},
        "projected": {"ihvp": "projected", "projection_dim": 512},
        "projected-ggn": {"ihvp": "projected", "projection_dim": 512, "curvature": "ggn"},
    }
    for name, kw in settings.items():
        start = time.perf_counter()
        try:
            r = influence(full, train, query, F.cross_entropy, damping=wl.wd, **kw)
        except ValueError as err:
            out["rows"].append({"method": name, "error": str(err)[:200]})
            continue
        pred = r.scores[:, removed].flatten()
        a = actual.flatten()
        out["rows"].append({
            "method": name,
            "pearson": float(stats.pearsonr(pred, a)[0]),
            "spearman": float(stats.spearmanr(pred, a)[0]),
            "slope": float(pred @ a / (a @ a)),
            "seconds": time.perf_counter() - start,
        })  # fmt: skip
        print(json.dumps(out["rows"][-1]), flush=True)
    (M.CACHE / "loo.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
