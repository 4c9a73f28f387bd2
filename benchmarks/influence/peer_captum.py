"""captum's NaiveInfluenceFunction beside hesse.influence on the same logistic regression.

    benchmarks/.venv/bin/python benchmarks/influence/peer_captum.py   (captum installed there)

Writes benchmarks/influence/peer.json: for L2 logistic regression on digits (λ = 0.01), the
least-squares factor between captum's scores and hesse's (its sign and scale convention), and
each one's Pearson / Spearman correlation with leave-one-out retraining.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from captum.influence import NaiveInfluenceFunction
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
import problems as P  # noqa: E402

from hesse.influence import influence  # noqa: E402

LAM = 1e-2


def captum_scores(model, x, y, xq, yq, rank: int, reg: float) -> tuple[torch.Tensor, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/model.pt"
        torch.save(model.state_dict(), path)
        start = time.perf_counter()
        inf = NaiveInfluenceFunction(
            model,
            DataLoader(TensorDataset(x, y), batch_size=len(y)),
            path,
            loss_fn=nn.CrossEntropyLoss(reduction="none"),
            hessian_reg=reg,
            projection_dim=rank,
        )
        scores = inf.influence((xq, yq))
        return scores.detach().double(), time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(1)
    x, y, xt, yt = P.digits()
    xq, yq = xt[:20], yt[:20]
    W = P.lr_fit(x, y, LAM)
    model = P.lr_model(W)
    before = float(P.lr_loss(W, xq, yq))
    removed = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))[:50]
    actual = []
    for i in removed:
        w = torch.ones(len(y), dtype=P.DT)
        w[i] = 0.0
        actual.append(float(P.lr_loss(P.lr_fit(x, y, LAM, w, start=W), xq, yq)) - before)
    actual = torch.tensor(actual, dtype=P.DT)
    ours = influence(model, [(x, y)], [(xq, yq)], F.cross_entropy, ihvp="exact", damping=LAM)
    rows = [_row("hesse exact", ours.scores, ours.scores, ours.seconds, removed, actual)]
    # captum adds hessian_reg to the Hessian of the SUM of the losses: n * LAM is our objective
    for rank, reg in ((50, LAM), (650, LAM), (50, len(y) * LAM), (650, len(y) * LAM)):
        theirs, seconds = captum_scores(model, x, y, xq, yq, rank, reg)
        name = f"captum Naive (rank {rank}, hessian_reg {reg:g})"
        rows.append(_row(name, theirs, ours.scores, seconds, removed, actual))
        print(rows[-1], flush=True)
    out = {"lambda": LAM, "queries": 20, "removed": 50, "captum": _version(), "rows": rows}
    (Path(__file__).parent / "peer.json").write_text(json.dumps(out, indent=1) + "\n")


def _row(name, scores, ours, seconds, removed, actual) -> dict:
    pred = scores.mean(0)[removed]
    factor = float((scores * ours).sum() / (ours * ours).sum())
    return {
        "method": name,
        "factor_vs_hesse": factor,
        "pearson_loo": float(stats.pearsonr(pred, actual)[0]),
        "spearman_loo": float(stats.spearmanr(pred, actual)[0]),
        "seconds": seconds,
    }


def _version() -> str:
    import captum

    return captum.__version__


if __name__ == "__main__":
    main()
