"""EnsLoss against fixed calibrated losses on eleven binary tabular tasks.

Claim (Wang and Shen 2024): drawing a new calibrated convex loss at every step (EnsLoss)
overfits less than any fixed loss, and ranks first on average over many tabular data sets.
Data: every bundled real classification set of scikit-learn (breast_cancer; iris, wine and
digits as one-vs-rest or grouped binary tasks) and the bundled regression set diabetes
(progression above the median); linnerud (20 samples) is left out. Plus two
make_classification variants and make_moons: eleven tasks. MLP 64-64 (tanh), one logit, Adam
lr 1e-3, batch 32, 150 epochs (long enough to overfit), 70/30 splits, 3 seeds. The curvature of
every trained model is measured with the same fixed loss, the logistic loss (EnsLoss has no
fixed loss to measure with; ``Objective`` refuses it). Run: ``python benchmarks/losses/ensloss.py``.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from _common import RESULTS, binary_scores, curvature, mlp, setup, split, table, train, write
from torch.nn import functional as F

from hesse import losses


def datasets():
    """Eleven binary tasks: (name, X, y in {0, 1})."""
    from sklearn import datasets as D

    X, y = D.load_breast_cancer(return_X_y=True)
    yield "breast_cancer", X, y
    X, y = D.load_iris(return_X_y=True)
    yield "iris versicolor-vs-rest", X, (y == 1).astype(int)
    yield "iris virginica-vs-rest", X, (y == 2).astype(int)
    X, y = D.load_wine(return_X_y=True)
    yield "wine class0-vs-rest", X, (y == 0).astype(int)
    yield "wine class1-vs-rest", X, (y == 1).astype(int)
    X, y = D.load_digits(return_X_y=True)
    yield "digits even-vs-odd", X, (y % 2).astype(int)
    yield "digits <5-vs->=5", X, (y >= 5).astype(int)
    X, y = D.load_diabetes(return_X_y=True)
    yield "diabetes >median", X, (y > np.median(y)).astype(int)
    X, y = D.make_classification(n_samples=600, n_features=20, n_informative=5, flip_y=0.1,
                                 random_state=1)  # fmt: skip
    yield "make_classification (10% flips)", X, y
    X, y = D.make_classification(n_samples=600, n_features=50, n_informative=10,
                                 n_redundant=20, random_state=2)  # fmt: skip
    yield "make_classification (50 features)", X, y
    X, y = D.make_moons(n_samples=600, noise=0.3, random_state=3)
    yield "make_moons (noise 0.3)", X, y


def _hinge(f, t):
    return F.relu(1 - (2 * t - 1) * f.reshape(-1)).mean()


def _exponential(f, t):
    return torch.exp(-(2 * t - 1) * f.reshape(-1)).mean()


def _logistic(f, t):
    return F.softplus(-(2 * t - 1) * f.reshape(-1)).mean()


FIXED = {"logistic": _logistic, "hinge": _hinge, "exponential": _exponential}
METHODS = (*FIXED, "EnsLoss")


def main(seeds: int = 3, epochs: int = 150) -> None:
    """Accuracy per task and method, mean rank, and the curvature under the logistic loss."""
    setup()
    acc: dict = {m: [] for m in METHODS}
    curv: dict = {m: [] for m in METHODS}
    names = []
    for dname, X, y in datasets():
        names.append(dname)
        per = {m: [] for m in METHODS}
        for seed in range(seeds):
            Xa, ya, Xb, yb = split(X, y, seed)
            for m in METHODS:
                loss = losses.EnsLoss(seed=seed) if m == "EnsLoss" else FIXED[m]
                model = mlp(X.shape[1], 1, seed=seed)
                train(model, Xa, ya, loss, epochs=epochs, lr=1e-3, batch=32, seed=seed,
                      cast=lambda t: t.float())  # fmt: skip
                per[m].append(binary_scores(model, Xb, yb)["acc"])
                if seed == 0:
                    c = curvature(model, Xa, ya.float(), _logistic, n_classes=2,
                                  loss_name="cross_entropy", k=6, budget=40)  # fmt: skip
                    curv[m].append(c)
        for m in METHODS:
            acc[m].append(float(np.mean(per[m])))
        print(dname, {m: round(acc[m][-1], 4) for m in METHODS}, flush=True)
    data = {"tasks": names, "accuracy": acc, "seeds": seeds, "epochs": epochs,
            "curvature": {m: [vars(c) for c in curv[m]] for m in METHODS}}  # fmt: skip
    write("ensloss", render(data), data)


def render(data: dict) -> str:
    """The two tables of ``results/ensloss.md`` from the raw numbers."""
    from scipy.stats import rankdata

    names, acc, curv = data["tasks"], data["accuracy"], data["curvature"]
    A = np.array([acc[m] for m in METHODS])  # (methods, tasks)
    ranks = np.stack([rankdata(-A[:, j]) for j in range(A.shape[1])], 1)  # ties: mean rank
    rows = [[n, *[float(A[i, j]) for i in range(len(METHODS))]] for j, n in enumerate(names)]
    rows.append(["**mean accuracy**", *[float(v) for v in A.mean(1)]])
    rows.append(["**mean rank**", *[float(v) for v in ranks.mean(1)]])
    crow = [[m, float(np.median([c["lambda_max"] for c in curv[m]])),
             float(np.median([c["trace"] for c in curv[m]])),
             " ".join(str(c["n_outliers"]) for c in curv[m])] for m in METHODS]  # fmt: skip
    return (
        f"Test accuracy (mean of {data['seeds']} seeds; 70/30 stratified splits) of an MLP "
        f"64-64 (tanh) trained {data['epochs']} epochs with Adam lr 1e-3, batch 32. Mean rank "
        f"over the {len(names)} tasks (1 = best; ties share the mean rank).\n\n"
        + table(["task", *METHODS], rows)
        + "\n\nCurvature of the seed-0 models, all measured with the logistic loss on the "
        "training set (hesse.eigs top 6, hesse.trace Hutch++ 40 products): median over the "
        "tasks of λmax and trace, and the outlier count per task (predicted: 1, C - 1 with "
        "C = 2; None: fewer than two positive eigenvalues).\n\n"
        + table(["method", "median λmax", "median trace", "outliers per task"], crow)
        + "\n"
    )


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--render"]:  # re-render results/ensloss.md from results/ensloss.json
        raw = json.loads((RESULTS / "ensloss.json").read_text())
        write("ensloss", render(raw), raw)
    else:
        main()
