"""Small L2-regularized logistic regressions with an exact (Newton) training loop, float64."""

import torch
import torch.nn.functional as F
from torch import nn

DT = torch.float64


def blobs(n: int, features: int = 3, classes: int = 3, seed: int = 0, spread: float = 1.5):
    """Overlapping Gaussian blobs: ``(x (n, features), y (n,))``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centers = spread * torch.randn(classes, features, generator=g, dtype=DT)
    return centers[y] + torch.randn(n, features, generator=g, dtype=DT), y


def flat(model: nn.Linear) -> torch.Tensor:
    return torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])


def load(model: nn.Linear, theta: torch.Tensor) -> nn.Linear:
    k = model.weight.numel()
    with torch.no_grad():
        model.weight.copy_(theta[:k].reshape(model.weight.shape))
        model.bias.copy_(theta[k:])
    return model


def mean_loss(theta, x, y, classes, weights=None, n=None):
    """Weighted sum of per-sample cross-entropies over ``n`` (default: the sample count)."""
    k = classes * x.shape[1]
    out = x @ theta[:k].reshape(classes, -1).T + theta[k:]
    losses = F.cross_entropy(out, y, reduction="none")
    w = torch.ones_like(losses) if weights is None else weights
    return (w * losses).sum() / (n or len(y))


def fit(x, y, classes, lam, weights=None, start=None, decay=None, total=None):
    """Minimize ``mean_loss + 1/2 sum decay_j theta_j^2`` by Newton's method to round-off.

    ``total`` divides the weighted sum of losses (default: the sample count).
    """
    d = classes * (x.shape[1] + 1)
    c = torch.full((d,), float(lam), dtype=DT) if decay is None else decay

    def objective(theta):
        return mean_loss(theta, x, y, classes, weights, total) + 0.5 * (c * theta**2).sum()

    return newton(objective, torch.zeros(d, dtype=DT) if start is None else start)


def newton(objective, theta):
    """Minimize a smooth convex ``objective(theta)`` by Newton's method from ``theta``."""
    for _ in range(50):
        step = torch.linalg.solve(
            torch.func.hessian(objective)(theta), torch.func.grad(objective)(theta)
        )
        theta = theta - step
        if step.norm() < 1e-13:
            break
    return theta


def trained(n=200, features=3, classes=3, lam=1e-2, seed=0):
    """``(model, x, y, theta)``: an L2 logistic regression trained exactly on blobs."""
    x, y = blobs(n, features, classes, seed)
    theta = fit(x, y, classes, lam)
    model = load(nn.Linear(features, classes).to(DT), theta).eval()
    return model, x, y, theta


# ---------------------------------------------------------------- factories for the CLI tests
def _images(n: int, seed: int):
    x, y = blobs(n, features=16, classes=3, seed=seed)
    return x.reshape(n, 1, 4, 4), y


def cli_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).to(DT).eval()


def cli_data():
    x, y = _images(48, 0)
    return [(x[:32], y[:32]), (x[32:], y[32:])]


def cli_test():
    return [_images(12, 1)]
