"""Z-loss against cross-entropy: top-k accuracy, and time per step as the class count grows.

Claims (de Brébisson and Vincent 2016): the Z-loss matches or beats cross-entropy on top-k
accuracy, and, being of the spherical family (it reads the logits only through o_y, sum o and
sum o^2), its value can be computed without forming the C logits. The training step here forms
them (both losses are O(C d) per sample); the "spherical value" column computes the Z-loss of
a linear output layer from o_y, s.h and h^T Q h with Q = W^T W and s = W^T 1 kept (O(d^2),
independent of C). Vincent et al. 2015's implicit update of W (which keeps the step O(d^2)) is
not implemented. Run: ``python benchmarks/losses/zloss.py``.
"""

from __future__ import annotations

import time

import torch
from _common import accuracy, curvature, mlp, setup, split, table, train, write
from torch.nn import functional as F

from hesse import losses

ZLOSS = losses.ZLoss(a=1.0, b=1.0)
LOSSES = {"cross_entropy": F.cross_entropy, ZLOSS.spec: ZLOSS}


def datasets():
    """Digits (10 classes) and a 100-class make_classification set."""
    from sklearn.datasets import load_digits, make_classification

    yield "digits (C=10)", *load_digits(return_X_y=True), 10, 3
    X, y = make_classification(n_samples=6000, n_features=40, n_informative=30, n_classes=100,
                               n_clusters_per_class=1, class_sep=2.0, random_state=0)  # fmt: skip
    yield "make_classification (C=100)", X, y, 100, 5


def accuracy_rows(epochs: int = 60):
    """Top-1 and top-k test accuracy and the Hessian's curvature, per data set and loss."""
    rows, data = [], []
    for name, X, y, C, k in datasets():
        Xa, ya, Xb, yb = split(X, y, 0)
        for lname, loss in LOSSES.items():
            model = mlp(X.shape[1], C, seed=0)
            train(model, Xa, ya, loss, epochs=epochs)
            top1, topk = accuracy(model, Xb, yb), accuracy(model, Xb, yb, k)
            curv = curvature(model, Xa, ya, loss, n_classes=C, loss_name=lname, k=12)
            rows.append([name, lname, top1, f"top-{k} {topk:.4f}", curv.lambda_max, curv.trace,
                         str(curv.n_outliers), str(curv.expected)])  # fmt: skip
            data.append({"data": name, "loss": lname, "top1": top1, "topk": topk, "k": k,
                         "curvature": vars(curv)})  # fmt: skip
            print(rows[-1], flush=True)
    return rows, data


def step_time(C: int, loss, d: int = 128, n: int = 256, reps: int = 30) -> float:
    """Median seconds of forward + backward of a linear output layer and the loss."""
    torch.manual_seed(0)
    head = torch.nn.Linear(d, C)
    h, y = torch.randn(n, d), torch.randint(0, C, (n,))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        head.zero_grad()
        loss(head(h), y).backward()
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2]


def spherical_value(C: int, d: int = 128, n: int = 256, reps: int = 30) -> tuple[float, float]:
    """Median seconds of the Z-loss value from kept statistics, and its error vs the direct one."""
    torch.manual_seed(0)
    W, b = torch.randn(C, d, dtype=torch.float64) / d**0.5, torch.zeros(C, dtype=torch.float64)
    h, y = torch.randn(n, d, dtype=torch.float64), torch.randint(0, C, (n,))
    Q, s = W.T @ W, W.sum(0)  # kept between steps by the spherical-family algorithms
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        o_y = (W[y] * h).sum(1) + b[y]
        mean = (h @ s + b.sum()) / C
        sq = ((h @ Q) * h).sum(1) / C  # b = 0
        z = (o_y - mean) / (sq - mean**2).sqrt()
        value = F.softplus(ZLOSS.a * (ZLOSS.b - z)).mean() / ZLOSS.a
        times.append(time.perf_counter() - t0)
    direct = ZLOSS(h @ W.T + b, y)
    return sorted(times)[reps // 2], abs(float(value - direct))


def main() -> None:
    """Both tables into results/zloss.md."""
    setup()
    acc_rows, acc_data = accuracy_rows()
    time_rows, time_data = [], []
    for C in (10, 100, 1000, 10000, 50000):
        ce, zl = step_time(C, F.cross_entropy), step_time(C, ZLOSS)
        sph, err = spherical_value(C)
        time_rows.append([C, 1e3 * ce, 1e3 * zl, 1e3 * sph, err])
        time_data.append({"C": C, "ce_ms": 1e3 * ce, "zloss_ms": 1e3 * zl,
                          "spherical_ms": 1e3 * sph, "spherical_abs_err": err})  # fmt: skip
        print(time_rows[-1], flush=True)
    text = (
        "Accuracy: MLP 64-64 (tanh), Adam lr 3e-3, batch 64, 60 epochs, seed 0, 70/30 split. "
        f"Z-loss with a = {ZLOSS.a:g}, b = {ZLOSS.b:g} (not tuned; the paper tunes both). "
        "Curvature: the Hessian of each model's own training loss, hesse.eigs top 12 and "
        "hesse.trace (Hutch++, 60 products).\n\n"
        + table(
            ["data", "loss", "top-1", "top-k", "λmax", "trace", "outliers", "predicted"], acc_rows
        )  # fmt: skip
        + "\n\nTime per step (one CPU thread, median of 30): a linear output layer d = 128 on a "
        "batch of 256, forward + backward, float32; the spherical column is the Z-loss value "
        "alone from kept statistics (float64), with its error against the direct value.\n\n"
        + table(["C", "CE step ms", "Z-loss step ms", "spherical value ms", "abs err"], time_rows)
        + "\n"
    )
    write("zloss", text, {"accuracy": acc_data, "time": time_data})


if __name__ == "__main__":
    main()
