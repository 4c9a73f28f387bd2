"""Influence, unlearning and a hypergradient for an L2 logistic regression on sklearn's digits.

Runs in a few seconds on a laptop CPU:

    python examples/influence_logistic.py

1. ``hesse.influence``: which training images most help and harm a test image, and a check
   against leave-one-out retraining for a few of them.
2. ``hesse.unlearn``: remove 20 training images with one Newton step; compare with retraining.
3. ``hesse.hypergradient``: d(validation loss)/d(weight decay), against finite differences.
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from hesse import Objective
from hesse.influence import hypergradient, influence, unlearn

WD = 1e-2  # weight decay: the training objective is mean cross-entropy + WD/2 |theta|^2


def train(x, y, wd=WD, start=None):
    """L-BFGS to a gradient norm of ~1e-10 (the model must be AT the minimum)."""
    model = nn.Linear(64, 10).double() if start is None else start
    opt = torch.optim.LBFGS(
        model.parameters(),
        max_iter=500,
        tolerance_grad=1e-10,
        tolerance_change=0,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        reg = sum((p**2).sum() for p in model.parameters())
        value = F.cross_entropy(model(x), y) + wd / 2 * reg
        value.backward()
        return value

    opt.step(closure)
    return model.eval()


def loss(model, x, y) -> float:
    """Mean cross-entropy, without a graph."""
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def copy(model):
    """A copy of the model, to warm-start retraining from it."""
    new = nn.Linear(64, 10).double()
    new.load_state_dict(model.state_dict())
    return new


def flat(model):
    """The parameters as one flat vector."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def main(n_train: int = 600, n_checked: int = 5) -> dict:
    """Run the three parts; returns their numbers (for the test)."""
    torch.manual_seed(0)
    X, Y = load_digits(return_X_y=True)
    X, Y = torch.tensor(X / 16.0), torch.tensor(Y)
    x, y, xt, yt = X[:n_train], Y[:n_train], X[1500:], Y[1500:]
    model = train(x, y)

    # 1. Influence of every training image on test image 0's loss. damping=WD makes
    #    H + WD I exactly the Hessian of the training objective.
    inf = influence(model, [(x, y)], [(xt[:1], yt[:1])], F.cross_entropy, ihvp="cg", damping=WD)
    top = inf.top(0, k=n_checked)
    print(
        f"test image 0 (label {int(yt[0])}): most helpful {top.helpful.tolist()}, "
        f"most harmful {top.harmful.tolist()}"
    )
    # scores are the change of the test loss when a point is REMOVED (its term l_i/n dropped);
    # retraining on the n-1 others with their mean differs by O(1/n): reweight to compare.
    before = loss(model, xt[:1], yt[:1])
    pairs = []
    for i in top.helpful.tolist():
        keep = torch.arange(n_train) != i
        scaled_wd = WD * n_train / (n_train - 1)  # same objective as dropping l_i / n
        retrained = train(x[keep], y[keep], scaled_wd, start=copy(model))
        actual = loss(retrained, xt[:1], yt[:1]) - before
        pairs.append((float(inf.scores[0, i]), actual))
        print(f"  remove {i:4d}: predicted {pairs[-1][0]:+.5f}, retrained {actual:+.5f}")

    # 2. Forget 20 images with one Newton step on the remaining objective.
    forget = torch.zeros(n_train, dtype=torch.bool)
    forget[:20] = True
    r = unlearn(
        model,
        [(x[forget], y[forget])],
        [(x[~forget], y[~forget])],
        F.cross_entropy,
        method="newton",
        weight_decay=WD,
    )
    retrained = train(x[~forget], y[~forget], start=copy(model))
    gap_before = float((flat(model) - flat(retrained)).norm())
    gap_after = float((flat(r.model) - flat(retrained)).norm())
    print(f"unlearn: distance to the retrained weights {gap_before:.4f} -> {gap_after:.6f}")

    # 3. d(validation loss)/d(WD) by the implicit function theorem, vs finite differences.
    inner = Objective(model, [(x, y)], F.cross_entropy)
    outer = Objective(model, [(xt, yt)], F.cross_entropy)
    hg = float(hypergradient(inner, outer, torch.tensor(WD, dtype=torch.float64)).value)
    h = 1e-4
    up = loss(train(x, y, WD + h, start=copy(model)), xt, yt)
    down = loss(train(x, y, WD - h, start=copy(model)), xt, yt)
    fd = (up - down) / (2 * h)
    print(f"hypergradient {hg:.6f}, finite differences {fd:.6f}")
    return {"pairs": pairs, "unlearn": (gap_before, gap_after), "hypergradient": (hg, fd)}


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
