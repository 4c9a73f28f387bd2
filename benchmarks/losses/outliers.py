"""The outlier count each loss predicts, checked on the digits demo trained with that loss.

Prediction (``hesse.analysis.outliers.expected_outliers``): the directions in which the loss's
output Hessian curves upward, C - 1 for every comp-sum loss (softmax ignores a shift of the
logits), C - 2 for the Z-loss (it also ignores a scale, which bends one direction down), C for
the squared loss. The digits CNN (``hesse.demo``, 3658 parameters,
10 classes) is trained with each loss by the demo's recipe (plain SGD) until its training
cross-entropy is 0.1 (MSE: until its loss is 0.01) or 60 epochs; then the top 20 eigenvalues
of its GGN and Hessian are computed and the eigengap heuristic counts the outliers.
Run: ``python benchmarks/losses/outliers.py`` (trained weights cached in ``.cache/``).
"""

from __future__ import annotations

import json
import math

import torch
from _common import CACHE, setup, table, write

import hesse
from hesse.analysis.outliers import find_outliers
from hesse.demo import digits

LOSSES = ["cross_entropy", "mse", "sum_exp", "comp_sum:tau=0.5", "gce:q=0.7", "mae", "zloss"]
K = 20
UNBOUNDED = {"sum_exp", "comp_sum:tau=0.5"}  # diverge (NaN) under the demo's plain SGD


def trained(name: str):
    """The digits CNN trained with ``name`` by the demo's recipe, cached.

    The unbounded losses (tau < 1) weight a sample by up to 1/p_y: a few hard digits blow the
    step up and plain SGD diverges at lr 0.1, 0.01 and 0.002; they get the same recipe with the
    gradient norm clipped at 1 (``train_clipped``).
    """
    config = digits.Config(loss=name)
    clipped = name in UNBOUNDED
    path = CACHE / f"digits-{name.replace(':', '_')}{'-clipped' if clipped else ''}.pt"
    model = digits.build_model(config)
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["state_dict"])
        training = {"clipped": False, **json.loads(saved["training"])}
    else:
        training = train_clipped(model, config) if clipped else digits.train(model, config)
        training["clipped"] = clipped
        torch.save({"state_dict": model.state_dict(), "training": json.dumps(training)}, path)
    return model.eval(), training, config


def train_clipped(model, config) -> dict:
    """``hesse.demo.digits.train`` with ``clip_grad_norm_(..., 1.0)`` before each step."""
    (X, y), _ = digits.parts(config)
    loss = digits.loss_function(config)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr)
    g = torch.Generator().manual_seed(config.seed)
    done = 0
    while done < config.max_epochs:
        done += 1
        for idx in torch.randperm(len(X), generator=g).split(config.batch_size):
            opt.zero_grad()
            loss(model(X[idx]), y[idx]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        with torch.no_grad():
            ce = torch.nn.functional.cross_entropy(model(X), y).item()
        if ce <= config.target():
            break
    with torch.no_grad():
        acc = (model(X).argmax(1) == y).float().mean().item()
    return {"epochs": done, "final_loss": ce, "accuracy": acc}


def spectrum(op) -> tuple[list[float], int]:
    """Top ``K`` eigenvalues and the products spent."""
    e = hesse.eigs(op, k=K, max_matvecs=300, seed=0)
    return [float(v) for v in e.values], e.n_matvecs


def main() -> None:
    """One row per loss: fit, the predicted count, and the GGN's and Hessian's counts."""
    setup()
    rows, data = [], []
    for name in LOSSES:
        model, training, config = trained(name)
        if not math.isfinite(training["final_loss"]):
            rows.append([name, training["clipped"], training["epochs"], "diverged", *["-"] * 8])
            data.append({"loss": name, "diverged": True})
            continue
        (X, y), _ = digits.parts(config)
        obj = hesse.Objective(model, (X, y), loss=digits.loss_function(config))
        row = {"loss": name, "clipped": training["clipped"], "epochs": training["epochs"],
               "train_acc": training["accuracy"]}  # fmt: skip
        for kind, op in (("ggn", hesse.GGNOperator(obj)), ("hessian", hesse.HessianOperator(obj))):
            values, used = spectrum(op)
            out = find_outliers(values, n_classes=10, loss_name=obj.loss_spec.kind, loss=0.0)
            row[kind] = {"values": values, "n_outliers": out.n_outliers, "gap": out.gap_ratio,
                         "expected": out.expected, "matvecs": used}  # fmt: skip
        data.append(row)
        g, h = row["ggn"], row["hessian"]
        rows.append([name, str(training["clipped"]), row["epochs"], row["train_acc"],
                     str(g["expected"]), str(g["n_outliers"]), g["gap"],
                     str(h["n_outliers"]), h["gap"], g["values"][0], h["values"][0],
                     min(h["values"])])  # fmt: skip
        print(rows[-1], flush=True)
    header = ["loss", "clipped", "epochs", "train acc", "predicted", "GGN outliers", "GGN gap",
              "Hessian outliers", "Hessian gap", "GGN λ1", "Hessian λ1",
              f"Hessian λ{K}"]  # fmt: skip
    text = (
        "Digits demo CNN (3658 parameters, 10 classes, 1797 images), trained by "
        "`hesse.demo.digits` with each loss (the demo's recipe: plain SGD, lr 0.1, batch 32; "
        "for the unbounded sum_exp and tau = 0.5, which diverge under it, the gradient norm "
        "clipped at 1) until the training cross-entropy is 0.1 (MSE: loss 0.01) or 60 epochs. "
        "Top 20 eigenvalues by `hesse.eigs` (Lanczos, at most 300 products); outliers = the "
        "count before the largest ratio λi/λi+1; gap = that ratio.\n\n" + table(header, rows) + "\n"
    )
    write("outliers", text, data)


if __name__ == "__main__":
    main()
