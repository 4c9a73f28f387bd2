"""The benchmark's models and exact retraining: L2 logistic regression and a small MLP on digits.

Retraining is what influence, unlearning and hypergradients are judged against, so it is
exact: Newton's method on the convex logistic regression (analytic Hessian, to round-off),
and L-BFGS to a tiny gradient norm, warm-started at the trained weights, for the MLP.
Removing point ``i`` sets its weight to 0 in ``sum_i w_i l_i / n`` (n unchanged): the
convention of ``hesse.influence``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

DT = torch.float64


def digits(seed: int = 0):
    """Digits as float64 features in [0, 1]: ``(x_train, y_train, x_test, y_test)``, 80/20."""
    X, y = load_digits(return_X_y=True)
    a, b, ya, yb = train_test_split(X / 16.0, y, test_size=0.2, random_state=seed, stratify=y)
    t = lambda v, dt: torch.tensor(v, dtype=dt)  # noqa: E731
    return t(a, DT), t(ya, torch.long), t(b, DT), t(yb, torch.long)


# ---------------------------------------------------------------- logistic regression
def lr_model(W: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` from ``W`` (classes, features + 1), the last column the bias."""
    model = nn.Linear(W.shape[1] - 1, W.shape[0]).to(DT).eval()
    with torch.no_grad():
        model.weight.copy_(W[:, :-1])
        model.bias.copy_(W[:, -1])
    return model


def lr_weights(model: nn.Linear) -> torch.Tensor:
    return torch.cat([model.weight.detach(), model.bias.detach()[:, None]], 1)


def _aug(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=DT)], 1)


def lr_loss(W, x, y, w=None, n=None) -> torch.Tensor:
    """``sum_i w_i CE_i / n`` (w = 1, n = len(y) by default); no penalty."""
    losses = F.cross_entropy(_aug(x) @ W.T, y, reduction="none")
    return (losses if w is None else w * losses).sum() / (n or len(y))


def lr_fit(x, y, decay, w=None, start=None, iters: int = 30) -> torch.Tensor:
    """Newton's method on ``lr_loss + 1/2 sum decay * W^2`` (decay scalar or shaped like W)."""
    xa, n, C = _aug(x), len(y), int(y.max()) + 1
    W = torch.zeros(C, xa.shape[1], dtype=DT) if start is None else start.clone()
    c = torch.as_tensor(decay, dtype=DT).expand(C, xa.shape[1]).reshape(-1)
    w = torch.ones(n, dtype=DT) if w is None else w
    onehot = F.one_hot(y, C).to(DT)
    for _ in range(iters):
        p = torch.softmax(xa @ W.T, 1)
        g = ((w[:, None] * (p - onehot)).T @ xa / n).reshape(-1) + c * W.reshape(-1)
        Z = (p[:, :, None] * xa[:, None, :]).reshape(n, -1) * w.sqrt()[:, None]
        diag = torch.einsum("ic,ij,ik->cjk", w[:, None] * p, xa, xa)
        H = torch.block_diag(*diag) - Z.T @ Z
        H = H / n + torch.diag(c)
        step = torch.linalg.solve(H, g)
        W = W - step.reshape(W.shape)
        if step.norm() < 1e-12 * (1 + W.norm()):
            break
    return W


# ---------------------------------------------------------------- MLP
def mlp(seed: int = 0, hidden: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).to(DT).eval()


def mlp_fit(model, x, y, wd, w=None, iters: int = 2000) -> nn.Module:
    """L-BFGS on ``sum w_i CE_i / n + wd/2 |theta|^2`` in place, to gradient norm ~1e-9."""
    n = len(y)
    w = torch.ones(n, dtype=DT) if w is None else w
    params = list(model.parameters())
    opt = torch.optim.LBFGS(
        params,
        lr=1,
        max_iter=iters,
        tolerance_grad=1e-10,
        tolerance_change=1e-15,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        losses = F.cross_entropy(model(x), y, reduction="none")
        value = (w * losses).sum() / n + wd / 2 * sum((p**2).sum() for p in params)
        value.backward()
        return value

    opt.step(closure)
    return model


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def copy_of(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def mean_loss(model, x, y) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).to(DT).mean())


def losses(model, x, y) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def mia_auc(model, x_member, y_member, x_out, y_out) -> float:
    """Loss-threshold membership inference: AUC of "member" = lower loss (0.5: no signal)."""
    a, b = losses(model, x_member, y_member), losses(model, x_out, y_out)
    # P(loss_member < loss_out) + 1/2 P(tie): the AUC over all thresholds
    less = (a[:, None] < b[None, :]).to(DT).mean()
    ties = (a[:, None] == b[None, :]).to(DT).mean()
    return float(less + 0.5 * ties)
