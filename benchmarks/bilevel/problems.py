r"""The two bilevel benchmark problems on sklearn's digits, as plain torch functions.

Imports only torch and sklearn, so the peer script runs it in its own virtual environment.

- ``cleaning``: data hyper-cleaning (Franceschi et al. 2017). 40% of the training labels are
  replaced by another class; ``x`` holds one logit per training sample, the lower level is
  the sigmoid-weighted cross-entropy of a multinomial logistic regression (plus a small L2 so
  it is strongly convex), the upper level the cross-entropy on clean validation data.
- ``decay``: per-block regularization. A multinomial logistic regression on 150 training
  samples whose weights are 9 blocks (one per row of the 8x8 image, and the bias); ``x``
  holds the log weight decay of each block; the lower level is the training cross-entropy plus
  :math:`\frac12\sum_j e^{x_j}\|\theta_j\|^2`, the upper level the validation
  cross-entropy.

Both take ``(x, y, batch)`` with ``y`` the flat parameters and ``batch`` an index tensor into
the training (lower) or validation (upper) set, or None for all of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

D = torch.float64


def _digits(seed: int):
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=D)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return X[perm], y[perm]


@dataclass
class Problem:
    """Data, shapes and the upper and lower functions of one benchmark problem."""

    name: str
    Xtr: torch.Tensor
    ytr: torch.Tensor
    Xval: torch.Tensor
    yval: torch.Tensor
    Xte: torch.Tensor
    yte: torch.Tensor
    shapes: list[tuple[int, ...]]
    n_x: int
    mu: float = 1e-3
    flipped: torch.Tensor | None = None

    @property
    def n_y(self) -> int:
        return sum(int(torch.tensor(s).prod()) for s in self.shapes)

    def unflatten(self, y: torch.Tensor) -> list[torch.Tensor]:
        out, i = [], 0
        for s in self.shapes:
            n = int(torch.tensor(s).prod())
            out.append(y[i : i + n].view(s))
            i += n
        return out

    def logits(self, y: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        ps = self.unflatten(y)
        return X @ torch.cat(ps[:-1]) + ps[-1]

    def upper(self, x, y, batch):
        idx = slice(None) if batch is None else batch
        return F.cross_entropy(self.logits(y, self.Xval[idx]), self.yval[idx])

    def lower(self, x, y, batch):
        idx = slice(None) if batch is None else batch
        ce = F.cross_entropy(self.logits(y, self.Xtr[idx]), self.ytr[idx], reduction="none")
        if self.name == "cleaning":
            return (torch.sigmoid(x[idx]) * ce).mean() + 0.5 * self.mu * (y @ y)
        decay = sum(
            0.5 * torch.exp(xj) * (p**2).sum() for xj, p in zip(x, self.unflatten(y), strict=True)
        )
        return ce.mean() + decay

    def sampler(self, batch: int | None):
        """``data(i, generator)`` for ``hesse.bilevel.solve``: mini-batches of ``batch`` samples."""

        def data(i, gen):
            if gen is None or batch is None:
                return None, None
            return (
                torch.randint(len(self.yval), (batch,), generator=gen),
                torch.randint(len(self.ytr), (batch,), generator=gen),
            )

        return data

    def init(self, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        y = 0.1 * torch.randn(self.n_y, generator=g, dtype=D)
        x0 = torch.zeros(self.n_x, dtype=D)
        return (x0, y) if self.name == "cleaning" else (x0 - 4.0, y)

    def test_accuracy(self, y: torch.Tensor) -> float:
        with torch.no_grad():
            return float((self.logits(y, self.Xte).argmax(1) == self.yte).double().mean())

    def retrain(self, x: torch.Tensor, y0: torch.Tensor, iters: int = 300) -> torch.Tensor:
        """The lower level solved to high accuracy at ``x`` (L-BFGS from ``y0``)."""
        y = y0.detach().clone().requires_grad_(True)
        opt = torch.optim.LBFGS(
            [y],
            lr=1,
            max_iter=iters,
            tolerance_grad=1e-10,
            tolerance_change=1e-14,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            loss = self.lower(x.detach(), y, None)
            loss.backward()
            return loss

        opt.step(closure)
        return y.detach()


def cleaning(seed: int = 0, n_train: int = 600, n_val: int = 300, noise: float = 0.4) -> Problem:
    """Hyper-cleaning on digits: ``noise`` of the training labels flipped to another class."""
    X, y = _digits(seed)
    Xtr, ytr = X[:n_train], y[:n_train].clone()
    g = torch.Generator().manual_seed(seed + 1)
    flipped = torch.rand(n_train, generator=g) < noise
    shift = torch.randint(1, 10, (n_train,), generator=g)
    ytr[flipped] = (ytr[flipped] + shift[flipped]) % 10
    sl = slice(n_train, n_train + n_val)
    return Problem(
        "cleaning",
        Xtr,
        ytr,
        X[sl],
        y[sl],
        X[n_train + n_val :],
        y[n_train + n_val :],
        [(64, 10), (10,)],
        n_train,
        flipped=flipped,
    )


def decay(seed: int = 0, n_train: int = 150, n_val: int = 300) -> Problem:
    """Per-block weight decay of a logistic regression trained on ``n_train`` digits."""
    X, y = _digits(seed)
    sl = slice(n_train, n_train + n_val)
    shapes = [(8, 10)] * 8 + [(10,)]
    return Problem(
        "decay",
        X[:n_train],
        y[:n_train],
        X[sl],
        y[sl],
        X[n_train + n_val :],
        y[n_train + n_val :],
        shapes,
        9,
    )
