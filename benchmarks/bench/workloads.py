"""The four workloads: model, batches and loss, built deterministically from a seed.

Every tool sees the same model (in eval mode) and the same list of ``(inputs, targets)``
batches, and analyses the Hessian of the mean loss over all samples (batch means weighted
by batch size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn


@dataclass
class Workload:
    """A model, its data and its loss: one row of every results table.

    Attributes:
        name: short name used in tables.
        model: the network, in eval mode, float32.
        batches: list of ``(inputs, targets)``; targets are class indices, flattened.
        loss: a ``nn.CrossEntropyLoss(reduction="mean")`` module (curvlinops needs a module).
        dense: whether a dense float64 Hessian is affordable (exact references).
        description: one line for the tables.
    """

    name: str
    model: nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    loss: nn.Module
    dense: bool
    description: str

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def n_samples(self) -> int:
        return sum(len(x) for x, _ in self.batches)

    def layers(self) -> dict[str, list[str]]:
        """Parameter names grouped by module (the blocks of the per-layer traces)."""
        groups: dict[str, list[str]] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                groups.setdefault(name.rpartition(".")[0], []).append(name)
        return groups


def _digits_batches(n_batches: int = 8, image: bool = False) -> list:
    """The 1797 scikit-learn digits, standardised, in ``n_batches`` (the last one uneven)."""
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0 - 0.5, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    if image:
        X = X.reshape(-1, 1, 8, 8)
    size = math.ceil(len(X) / n_batches)  # 225 * 7 + 222
    return list(zip(X.split(size), y.split(size), strict=True))


def _fit(model: nn.Module, batches, loss: nn.Module, epochs: int, lr: float = 3e-3) -> nn.Module:
    """A few epochs of Adam, so that the Hessian is taken at a trained point, not at init."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in batches:
            opt.zero_grad()
            loss(model(x), y).backward()
            opt.step()
    return model.eval()


def mlp(seed: int = 0) -> Workload:
    """64-32-10 tanh MLP on digits: small enough for an exact dense Hessian."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    batches, loss = _digits_batches(), nn.CrossEntropyLoss()
    return Workload(
        "mlp",
        _fit(model, batches, loss, 30),
        batches,
        loss,
        True,
        "MLP 64-32-10 (tanh), digits 1797 samples in 8 batches",
    )


def cnn(seed: int = 0) -> Workload:
    """Two conv + batch-norm (eval mode) blocks and a linear head on 8x8 digits."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    batches, loss = _digits_batches(image=True), nn.CrossEntropyLoss()
    return Workload(
        "cnn",
        _fit(model, batches, loss, 15),
        batches,
        loss,
        True,
        "CNN 2x(conv3x3+BN(eval)+ReLU)+linear, digits 8x8 in 8 batches",
    )


def wide_mlp(seed: int = 0) -> Workload:
    """64-544-512-10 tanh MLP on digits (about 320k parameters)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 544), nn.Tanh(), nn.Linear(544, 512), nn.Tanh(), nn.Linear(512, 10)
    )
    batches, loss = _digits_batches(), nn.CrossEntropyLoss()
    return Workload(
        "wide_mlp",
        _fit(model, batches, loss, 3, lr=1e-3),
        batches,
        loss,
        False,
        "MLP 64-544-512-10 (tanh), digits 1797 samples in 8 batches",
    )


class _Block(nn.Module):
    """Pre-norm transformer block with causal self-attention written out in plain ops.

    Plain ops (not ``nn.MultiheadAttention`` or ``scaled_dot_product_attention``) so that
    every tool can differentiate it twice, forward-over-reverse included.
    """

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)
        q, k, v = (t.reshape(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(D // self.heads)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A small causal language model; returns logits flattened to ``(B*T, vocab)``."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, context: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[_Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x))).reshape(-1, self.head.out_features)


def transformer(seed: int = 0, n_seq: int = 32, n_batches: int = 4) -> Workload:
    """TinyGPT (about 1.06M parameters) on synthetic tokens from a random sparse Markov chain."""
    vocab, context = 1024, 32
    gen = torch.Generator().manual_seed(seed)
    nxt = torch.randint(vocab, (vocab, 4), generator=gen)  # each token has 4 likely successors
    seq = torch.empty(n_seq, context + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(vocab, (n_seq,), generator=gen)
    for t in range(context):
        choice = torch.randint(4, (n_seq,), generator=gen)
        seq[:, t + 1] = nxt[seq[:, t], choice]
    x, y = seq[:, :-1], seq[:, 1:]
    size = n_seq // n_batches
    batches = [(xb, yb.reshape(-1)) for xb, yb in zip(x.split(size), y.split(size), strict=True)]
    torch.manual_seed(seed)
    model = TinyGPT(vocab, d=128, layers=4, heads=4, context=context)
    loss = nn.CrossEntropyLoss()
    return Workload(
        "transformer",
        _fit(model, batches, loss, 10, lr=1e-3),
        batches,
        loss,
        False,
        f"TinyGPT d=128 4 layers vocab {vocab}, {n_seq}x{context} synthetic tokens, "
        f"{n_batches} batches",
    )


WORKLOADS = {"mlp": mlp, "cnn": cnn, "wide_mlp": wide_mlp, "transformer": transformer}


def flat_params(model: nn.Module) -> torch.Tensor:
    """The trainable parameters as one flat vector, in ``named_parameters`` order."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def criterion(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy, as a function (for tools that take one)."""
    return F.cross_entropy(logits, targets)
