"""The tiny-lm demo: a character-level transformer trained on text that ships with scikit-learn.

The text is the dataset descriptions in ``sklearn/datasets/descr/*.rst`` (about 43 kB),
cut into paragraphs and then into sequences of at most ``context + 1`` characters, so that
sequences have different lengths and each batch's mean loss is over a different number of
tokens: the objective weights every batch by its token count (``loss_fn`` returns it).

Attention and MLP keep their parameters directly (not in sub-``Linear`` modules), so that
``blocks(by="module")`` gives one block per attention and one per MLP, the split Q-BERT
(Shen et al. 2020) uses for BERT's per-layer Hessian spectra.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._demo import Demo, split

IGNORE = -100
"""Target of padding positions (``F.cross_entropy``'s default ``ignore_index``)."""


@dataclass(frozen=True)
class Config:
    """Training configuration of the tiny transformer (hashed into the cache key)."""

    loss: str = "cross_entropy"
    seed: int = 0
    context: int = 32
    width: int = 32
    layers: int = 2
    heads: int = 2
    lr: float = 0.5
    batch_size: int = 32
    steps: int = 400
    holdout: float = 0.0


class Attention(nn.Module):
    """Causal multi-head self-attention with its four parameters held directly."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv_weight = nn.Parameter(torch.randn(3 * width, width) / math.sqrt(width))
        self.qkv_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_weight = nn.Parameter(torch.randn(width, width) / math.sqrt(width))
        self.out_bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, W) -> (B, T, W)``; written out (no fused kernel) so forward-mode AD works.

        q, k and v are ``heads x head size`` wide, which is ``W`` until heads are pruned.
        """
        B, T, _ = x.shape
        inner = self.out_weight.shape[1]
        q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).split(inner, dim=-1)
        q, k, v = (t.reshape(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        y = scores.masked_fill(causal, float("-inf")).softmax(-1) @ v
        return F.linear(y.transpose(1, 2).reshape(B, T, inner), self.out_weight, self.out_bias)


class MLP(nn.Module):
    """Two-layer GELU MLP of width ``4 * width`` with its parameters held directly."""

    def __init__(self, width: int):
        super().__init__()
        self.in_weight = nn.Parameter(torch.randn(4 * width, width) / math.sqrt(width))
        self.in_bias = nn.Parameter(torch.zeros(4 * width))
        self.out_weight = nn.Parameter(torch.randn(width, 4 * width) / math.sqrt(4 * width))
        self.out_bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, W) -> (B, T, W)``."""
        hidden = F.gelu(F.linear(x, self.in_weight, self.in_bias))
        return F.linear(hidden, self.out_weight, self.out_bias)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(width), Attention(width, heads)
        self.ln2, self.mlp = nn.LayerNorm(width), MLP(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, W) -> (B, T, W)``."""
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Character-level decoder-only transformer: token ids ``(B, T)`` to logits ``(B, T, V)``."""

    def __init__(self, vocab: int, config: Config):
        super().__init__()
        self.embed = nn.Embedding(vocab, config.width)
        self.position = nn.Embedding(config.context, config.width)
        self.blocks = nn.ModuleList(Block(config.width, config.heads) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of the next character at every position."""
        x = self.embed(tokens) + self.position.weight[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def text() -> str:
    """The training text: scikit-learn's dataset descriptions, in file-name order."""
    folder = resources.files("sklearn.datasets") / "descr"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".rst")), key=lambda f: f.name)
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


def vocabulary() -> list[str]:
    """The characters of ``text()``, sorted."""
    return sorted(set(text()))


def dataset(config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences ``(N, context)`` of token ids and next-token targets (``IGNORE`` on padding)."""
    index = {c: i for i, c in enumerate(vocabulary())}
    pieces = [
        paragraph[i : i + config.context + 1]
        for paragraph in text().split("\n\n")
        for i in range(0, len(paragraph), config.context + 1)
    ]
    pieces = [p for p in pieces if len(p) >= 4]
    inputs = torch.zeros(len(pieces), config.context, dtype=torch.long)
    targets = torch.full((len(pieces), config.context), IGNORE, dtype=torch.long)
    for row, piece in enumerate(pieces):
        ids = torch.tensor([index[c] for c in piece])
        inputs[row, : len(ids) - 1], targets[row, : len(ids) - 1] = ids[:-1], ids[1:]
    return inputs, targets


def token_loss(model: nn.Module, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the batch's real tokens, and their number (the batch's weight)."""
    inputs, targets = batch
    logits = model(inputs)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return loss, (targets != IGNORE).sum()


def build_model(config: Config) -> nn.Module:
    """A fresh ``TinyLM`` seeded by ``config.seed``."""
    if config.loss != "cross_entropy":
        raise ValueError(
            f"tiny-lm demo: loss {config.loss!r} is not supported; the language model is "
            "trained with cross_entropy (per-token weighted). Drop --loss."
        )
    torch.manual_seed(config.seed)
    return TinyLM(len(vocabulary()), config)


def parts(config: Config) -> tuple[tuple, tuple]:
    """``(inputs, targets)`` of the training sequences and of the held-out ones."""
    inputs, targets = dataset(config)
    train, test = split(len(inputs), config.holdout, config.seed)
    return (inputs[train], targets[train]), (inputs[test], targets[test])


def train(model: nn.Module, config: Config, *, progress: bool = False) -> dict:
    """Train with plain SGD (no momentum) on random mini-batches of sequences."""
    (inputs, targets), _ = parts(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    for _ in tqdm(range(config.steps), desc="training tiny-lm", disable=not progress):
        idx = torch.randint(len(inputs), (config.batch_size,), generator=generator)
        optimizer.zero_grad()
        token_loss(model, (inputs[idx], targets[idx]))[0].backward()
        optimizer.step()
    with torch.no_grad():
        final = token_loss(model, (inputs, targets))[0].item()
    return {"steps": config.steps, "final_loss": final}


def make_demo(model: nn.Module, config: Config, training: dict):
    """Package the trained model as a ``hesse.demo.Demo``."""
    (inputs, targets), (test_inputs, test_targets) = parts(config)
    vocab = len(vocabulary())
    held_out = f" ({len(test_inputs)} more held out)" if len(test_inputs) else ""
    n_params = sum(p.numel() for p in model.parameters())
    return Demo(
        name="tiny-lm",
        model=model,
        inputs=inputs,
        targets=targets,
        test_inputs=test_inputs,
        test_targets=test_targets,
        loss=None,
        loss_fn=token_loss,
        lr=config.lr,
        n_classes=vocab,
        description=(
            f"A {n_params}-parameter character-level transformer ({config.layers} layers, "
            f"width {config.width}, {config.heads} heads, {vocab} characters) trained with "
            f"plain SGD (lr {config.lr}, {config.steps} steps of {config.batch_size} sequences) "
            f"on scikit-learn's dataset descriptions: {len(inputs)} sequences of up to "
            f"{config.context} characters{held_out}; the loss is the mean over tokens."
        ),
        training={"config": {**vars(config)}, **training},
        batch_size=128,
        # A product over all 1380 sequences takes ~1 s on one core; 128 sequences and smaller
        # budgets keep the whole report near a minute.
        defaults={"samples": 128, "k": 10, "budget": 40, "steps": 40, "probes": 3},
    )
