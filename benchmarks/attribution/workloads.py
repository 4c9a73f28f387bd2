"""The three attribution workloads: an MLP and a CNN on digits, and a tiny character LM.

Each is small enough that one CPU core retrains it in about a second, so that the ground truth
(>= 100 models trained on random halves of the training set) takes minutes. Every model is
trained on ``mean loss + wd/2 |theta|^2`` (the weight decay written into the loss, not into the
optimizer), so that ``damping=wd`` makes hesse's curvature that of the training objective.

Query outputs (what LDS correlates with): the margin ``z_y - logsumexp_{c != y} z_c`` for the
classifiers (TRAK's), the mean token loss of a sequence for the LM.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent.parent / "influence"))
import problems as P  # noqa: E402  (benchmarks/influence: the digits split)

from hesse.demo import digits as digits_demo  # noqa: E402
from hesse.demo import tiny_lm  # noqa: E402

DT = torch.float32


@dataclass
class Workload:
    """A model family, its data, how to train it, and what its queries output."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor
    make: Callable[[int], nn.Module]
    fit: Callable[[nn.Module, torch.Tensor, torch.Tensor, int], nn.Module]
    output: str  # "margin" or "loss" (see hesse.influence.lds)
    wd: float
    classes: int

    def train(self, indices: torch.Tensor, seed: int, y: torch.Tensor | None = None) -> nn.Module:
        """A fresh model (init from ``seed``) trained on the points ``indices``."""
        y = self.y if y is None else y
        return self.fit(self.make(seed), self.x[indices], y[indices], seed).eval()

    def outputs(self, model: nn.Module) -> torch.Tensor:
        """``(n_query,)`` the query outputs of ``model``."""
        with torch.no_grad():
            out = model(self.xq)
        if self.output == "loss":
            return lm_loss(out, self.yq, reduction="none").double()
        return margins(out, self.yq).double()

    @property
    def loss(self) -> Callable:
        """The mean training loss ``F.cross_entropy`` (over tokens for the LM's logits)."""
        return F.cross_entropy  # class-first LM logits: the mean over all tokens


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """TRAK's margin: the correct logit minus the logsumexp of the others."""
    correct = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], float("-inf"))
    return correct - others.logsumexp(1)


def lm_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of ``(B, V, T)`` logits: the mean, or one mean per sequence."""
    per_token = F.cross_entropy(logits, y, reduction="none")
    return per_token.mean() if reduction == "mean" else per_token.mean(1)


def _penalized(model, wd):
    return wd / 2 * sum((p**2).sum() for p in model.parameters())


def _adam(model, x, y, seed, *, loss, wd, lr, steps, batch):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        opt.zero_grad()
        (loss(model(x[idx]), y[idx]) + _penalized(model, wd)).backward()
        opt.step()
    return model


def _lbfgs(model, x, y, seed, *, wd, iters=150):
    opt = torch.optim.LBFGS(
        model.parameters(), max_iter=iters, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-7, tolerance_change=1e-12,
    )  # fmt: skip

    def closure():
        opt.zero_grad()
        value = F.cross_entropy(model(x), y) + _penalized(model, wd)
        value.backward()
        return value

    opt.step(closure)
    return model


def _digits(n_train: int, n_query: int):
    x, y, xt, yt = P.digits()
    return x[:n_train].to(DT), y[:n_train], xt[:n_query].to(DT), yt[:n_query]


def mlp_digits(n_train: int = 500, n_query: int = 50) -> Workload:
    """A 64-32-10 tanh MLP (2410 parameters), trained to convergence by L-BFGS."""
    x, y, xq, yq = _digits(n_train, n_query)

    def make(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def fit(model, x, y, seed):
        return _lbfgs(model, x, y, seed, wd=1e-3)

    return Workload("mlp-digits", x, y, xq, yq, make, fit, "margin", 1e-3, 10)


def cnn_digits(n_train: int = 500, n_query: int = 50) -> Workload:
    """The digits CNN of hesse.demo (3658 parameters), trained by Adam for 200 steps of 50."""
    x, y, xq, yq = _digits(n_train, n_query)
    x, xq = x.reshape(-1, 1, 8, 8), xq.reshape(-1, 1, 8, 8)

    def make(seed):
        return digits_demo.build_model(digits_demo.Config(seed=seed))

    def fit(model, x, y, seed):
        return _adam(model, x, y, seed, loss=F.cross_entropy, wd=1e-3, lr=0.01, steps=200, batch=50)

    return Workload("cnn-digits", x, y, xq, yq, make, fit, "margin", 1e-3, 10)


class TinyGPT(nn.Module):
    """A 1-block causal transformer of ``nn.Linear`` and ``nn.Embedding`` layers.

    No LayerNorm affine, so that every parameter sits in a layer that KFAC/EK-FAC (hesse's and
    kronfluence's) factorize. Returns logits CLASS-FIRST, ``(B, V, T)``, as ``F.cross_entropy``
    takes them.
    """

    def __init__(self, vocab: int, context: int, width: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.embed, self.position = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.head = nn.Linear(width, vocab)
        self.norm = nn.LayerNorm(width, elementwise_affine=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        x = self.embed(tokens) + self.position(torch.arange(T, device=tokens.device).expand(B, T))
        q, k, v = self.qkv(self.norm(x)).reshape(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).triu(1)
        y = a.masked_fill(causal, float("-inf")).softmax(-1) @ v
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, -1))
        x = x + self.down(F.gelu(self.up(self.norm(x))))
        return self.head(self.norm(x)).transpose(1, 2)


def tiny_lm_text(n_train: int = 200, n_query: int = 20, context: int = 16) -> Workload:
    """A 1-block character transformer (width 16) on scikit-learn's bundled text.

    hesse's tiny-lm demo's text and vocabulary, but :class:`TinyGPT`: the demo's model keeps raw
    parameters that no Kronecker method factorizes.
    """
    chars = tiny_lm.vocabulary()
    index = {c: i for i, c in enumerate(chars)}
    text = tiny_lm.text()
    ids = torch.tensor([index[c] for c in text])
    step = context + 1
    seqs = ids[: len(ids) // step * step].reshape(-1, step)
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(0))
    train, query = seqs[order[:n_train]], seqs[order[n_train : n_train + n_query]]

    def make(seed):
        torch.manual_seed(seed)
        return TinyGPT(len(chars), context)

    def fit(model, x, y, seed):
        return _adam(model, x, y, seed, loss=lm_loss, wd=1e-4, lr=0.01, steps=200, batch=32)

    w = Workload(
        "tiny-lm", train[:, :-1], train[:, 1:], query[:, :-1], query[:, 1:], make, fit, "loss",
        1e-4, len(chars),
    )  # fmt: skip
    return w


WORKLOADS = {"mlp-digits": mlp_digits, "cnn-digits": cnn_digits, "tiny-lm": tiny_lm_text}
