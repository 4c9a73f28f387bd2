"""The models both tools analyse, each seen the way hesse takes it and the way curvlinops does.

hesse takes the model as it is (``Objective(model, batches, loss, params=...)``); curvlinops
needs a module that returns a tensor with the classes on dim 1 and ``(X, y)`` batches. Both
views share the same ``nn.Parameter`` objects, and both analyse the same parameters: the ones
in modules curvlinops can factor (``nn.Linear``, ``nn.Conv2d``); LayerNorms, embeddings and
Conv1D stay fixed in the comparison (the hesse-only cases in ``run.py`` cover them).

Every loss is a mean cross-entropy over all counted outputs (one per sample, or one per
token), so the objective is the same function for both: hesse weighs a batch by its counted
outputs, curvlinops by ``reduction="mean"`` with ``num_data`` and
``num_per_example_loss_terms`` given.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

MAIN_SITE = "/work/main/.venv/lib/python3.11/site-packages"


@dataclass
class Workload:
    """One model with its data, as hesse and as curvlinops take it.

    Attributes:
        model, batches, loss: hesse's ``Objective(model, batches, loss, params=params)``.
        params: Names of the analysed parameters, in the model's order.
        c_model, c_batches: curvlinops' module (a tensor, classes on dim 1) and ``(X, y)``.
        n, terms: samples, and counted outputs per sample (tokens).
        ekfac: whether curvlinops' EKFAC takes the outputs (it refuses more than 2-d).
    """

    name: str
    model: nn.Module
    batches: list
    loss: object
    params: list[str]
    c_model: nn.Module
    c_batches: list
    n: int
    terms: int = 1
    ekfac: bool = True
    notes: list[str] = field(default_factory=list)


def _split(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _linear_names(model: nn.Module, kinds=(nn.Linear, nn.Conv2d)) -> list[str]:
    out = []
    for mname, m in model.named_modules():
        if isinstance(m, kinds):
            out += [f"{mname}.{p}" if mname else p for p, _ in m.named_parameters()]
    order = [n for n, _ in model.named_parameters()]
    return sorted(out, key=order.index)


def _plain(name, model, X, Y, batch, terms=1, ekfac=True) -> Workload:
    batches = [(X[s], Y[s]) for s in _split(len(X), batch)]
    return Workload(
        name,
        model.eval(),
        batches,
        F.cross_entropy,
        _linear_names(model),
        model,
        batches,
        len(X),
        terms,
        ekfac,
    )


def mlp(dtype, size: str) -> Workload:
    """A tanh MLP, cross-entropy on 10 classes; the last batch uneven."""
    w, h, n, b = (20, 32, 200, 64) if size == "agree" else (64, 128, 1024, 256)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(w, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, 10))
    X = torch.randn(n, w, generator=g)
    return _plain("mlp", model.to(dtype), X.to(dtype), torch.randint(0, 10, (n,), generator=g), b)


def cnn(dtype, size: str, pool: str = "avg") -> Workload:
    """Two 3x3 convolutions and a linear head; ``pool="max"``: ReLU and max-pooling."""
    c, s, n, b = (4, 8, 96, 32) if size == "agree" else (16, 16, 256, 128)
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    act, down = (nn.Tanh, nn.AvgPool2d) if pool == "avg" else (nn.ReLU, nn.MaxPool2d)
    model = nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1),
        act(),
        nn.Conv2d(c, c, 3, padding=1),
        act(),
        down(2),
        nn.Flatten(),
        nn.Linear(c * (s // 2) ** 2, 10),
    )
    X = torch.randn(n, 3, s, s, generator=g)
    name = "cnn" if pool == "avg" else "cnn_maxpool"
    return _plain(name, model.to(dtype), X.to(dtype), torch.randint(0, 10, (n,), generator=g), b)


class Block(nn.Module):
    """A pre-norm causal transformer block, attention written with four ``nn.Linear``."""

    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        # no key bias: its gradient is 0 (softmax is shift-invariant), and hesse's coverage
        # check refuses a parameter whose gradient is round-off (RESULTS.md, "hesse issues")
        self.q, self.v, self.o = (nn.Linear(d, d) for _ in range(3))
        self.k = nn.Linear(d, d, bias=False)
        self.fc, self.proj = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        h = self.ln1(x)
        q, k, v = (
            m(h).view(B, T, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, D))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class BlockModel(nn.Module):
    """Features ``(B, T, f)`` -> Linear -> Block -> head: per sample (mean over T) or per token.

    Per token, the logits are returned ``(B, classes, T)`` (classes on dim 1, as cross-entropy
    and curvlinops take them).
    """

    def __init__(self, f: int, d: int, heads: int, classes: int, per_token: bool):
        super().__init__()
        self.inp, self.block = nn.Linear(f, d), Block(d, heads, 2 * d)
        self.head, self.per_token = nn.Linear(d, classes), per_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(self.inp(x))
        return self.head(h).transpose(1, 2) if self.per_token else self.head(h.mean(1))


def block(dtype, size: str, per_token: bool = False) -> Workload:
    """The transformer block; LayerNorms fixed (curvlinops cannot factor them)."""
    f, d, t, n, b, c = (6, 16, 6, 64, 24, 5) if size == "agree" else (32, 64, 16, 128, 64, 10)
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    model = BlockModel(f, d, 4, c, per_token).to(dtype)
    X = torch.randn(n, t, f, generator=g).to(dtype)
    Y = torch.randint(0, c, (n, t) if per_token else (n,), generator=g)
    name = "block_tokens" if per_token else "block"
    return _plain(name, model, X, Y, b, terms=t if per_token else 1, ekfac=not per_token)


def transformers_available(extra: str | None) -> bool:
    """Import transformers, from ``extra`` (a site-packages appended after ours) if given."""
    if extra:
        sys.path.append(extra)
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def gpt2_model(dtype, size: str, tied: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, embd, vocab = (1, 16, 32) if size == "agree" else (2, 64, 64)
    config = GPT2Config(
        n_layer=layers,
        n_embd=embd,
        n_head=2 if size == "agree" else 4,
        vocab_size=vocab,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(3)
    return GPT2LMHeadModel(config).to(dtype).eval()


class ShiftedHead(nn.Module):
    """GPT-2's logits for the positions that have a next token, ``(B, V, T-1)``, for curvlinops.

    Hugging Face's causal-LM loss shifts the labels inside the model, and its LM head also runs
    on the last position, whose output no loss term reaches; hesse drops such positions
    (docs/kfac.md, "positions nothing reaches"), curvlinops would count them. Applying the
    head to the first ``T-1`` hidden states gives both tools the same matrix.
    """

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.gpt.transformer(input_ids=ids).last_hidden_state[:, :-1]
        return self.gpt.lm_head(h).transpose(1, 2)


def gpt2(dtype, size: str) -> Workload:
    """An untied GPT-2 from a config; both tools analyse ``lm_head`` (the only nn.Linear)."""
    gpt = gpt2_model(dtype, size, tied=False)
    n, t, b = (12, 8, 6) if size == "agree" else (32, 16, 16)
    ids = torch.randint(
        0, gpt.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(3)
    )
    batches = [{"input_ids": ids[s], "labels": ids[s]} for s in _split(n, b)]
    c_batches = [(ids[s], ids[s, 1:]) for s in _split(n, b)]
    return Workload(
        "gpt2",
        gpt,
        batches,
        None,
        ["lm_head.weight"],
        ShiftedHead(gpt),
        c_batches,
        n,
        t - 1,
        ekfac=False,
    )
