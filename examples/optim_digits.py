"""Second-order and sharpness-aware training on the digits data, in a plain training loop.

Trains the same small MLP with SGD, AdaHessian, SophiaH, SophiaG, SAM, M-FAC and SGD with a
Hessian-trace penalty, then asks hesse how sharp each result is (top Hessian eigenvalue and
trace on the training data). About 20 seconds on one CPU thread.

    python examples/optim_digits.py [EPOCHS]
"""

import sys

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import hesse
from hesse import optim, regularize


def data():
    """Digits as flat 64-pixel rows in [0, 1]; the first 1400 train, the rest are held out."""
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16
    y = torch.tensor(y)
    return (X[:1400], y[:1400]), (X[1400:], y[1400:])


def make(name: str, params):
    """Each optimizer with a learning rate that works for this model."""
    return {
        "SGD": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        "AdaHessian": lambda: optim.AdaHessian(params, lr=0.05),
        "SophiaH": lambda: optim.SophiaH(params, lr=3e-3, weight_decay=0.0),
        "SophiaG": lambda: optim.SophiaG(params, lr=3e-3, weight_decay=0.0),
        "SAM": lambda: optim.SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
        "M-FAC": lambda: optim.MFAC(params, lr=0.1, m=32, damping=0.1, momentum=0.9),
        "SGD + trace penalty": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    }[name]()


def step(name: str, opt, model, xb, yb, seed: int) -> None:
    """One training step on the batch ``(xb, yb)``, the way each optimizer wants it."""
    if name == "SophiaG":  # the Gauss-Newton-Bartlett estimate samples labels from the logits

        def closure():
            logits = model(xb)
            return F.cross_entropy(logits, yb), logits

        opt.step(closure)
    elif name in ("SGD", "SGD + trace penalty"):
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        if name != "SGD":  # a differentiable Hutchinson estimate of tr(H), fresh probes
            loss = loss + 1e-3 * regularize.hessian_trace(loss, model.parameters(), seed=seed)
        loss.backward()
        opt.step()
    else:  # the closure returns the loss; the optimizer differentiates it
        opt.step(lambda: F.cross_entropy(model(xb), yb))


def train(name: str, epochs: int = 5, seed: int = 0) -> dict:
    """Train one MLP with optimizer ``name``; its losses, test accuracy and sharpness."""
    (X, y), (X_test, y_test) = data()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    opt = make(name, list(model.parameters()))
    order = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for i, idx in enumerate(torch.randperm(len(X), generator=order).split(64)):
            step(name, opt, model, X[idx], y[idx], seed=epoch * 1000 + i)
    H = hesse.HessianOperator(hesse.Objective(model, [(X, y)], loss=F.cross_entropy))
    with torch.no_grad():
        accuracy = (model(X_test).argmax(1) == y_test).float().mean().item()
        loss = F.cross_entropy(model(X), y).item()
    return {
        "train_loss": loss,
        "test_accuracy": accuracy,
        "lambda_max": hesse.eigs(H, k=1).values[0].item(),
        "trace": hesse.trace(H, budget=30).value,
    }


def main(epochs: int = 5, names=None) -> dict:
    """Train every optimizer and print one table; returns the rows."""
    torch.set_num_threads(1)
    names = names or ["SGD", "AdaHessian", "SophiaH", "SophiaG", "SAM", "M-FAC",
                      "SGD + trace penalty"]  # fmt: skip
    rows = {name: train(name, epochs) for name in names}
    print(f"{'optimizer':22s} {'train loss':>10s} {'test acc':>9s} {'λmax':>8s} {'trace':>8s}")
    for name, r in rows.items():
        print(
            f"{name:22s} {r['train_loss']:10.4f} {r['test_accuracy']:9.3f} "
            f"{r['lambda_max']:8.3f} {r['trace']:8.2f}"
        )
    return rows


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
