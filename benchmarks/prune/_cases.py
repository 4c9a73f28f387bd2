"""The models of the pruning benchmark, a masked fine-tune, and measurements.

- the two demos (``load_demo(name, holdout=0.2)``);
- a small BERT (``BertForSequenceClassification`` from a config) trained here on scikit-learn's
  digits read as 16 tokens of 2x2-pixel patches (held-out accuracy about 70%: it overfits);
- a small MLP on scikit-learn's digits, trained to a training loss near 0.067, for the
  indefinite-Hessian table (issue item 0).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hesse.demo import load_demo
from hesse.problem._evaluate import evaluate


@dataclass
class Case:
    name: str
    model: nn.Module
    train: list  # batches the curvature is computed on and measured on
    test: list
    loss: Any
    loss_fn: Any
    tune_batches: list  # mini-batches of the short fine-tune
    lr: float
    optimizer: str  # "sgd" or "adam"

    def measure(self, model: nn.Module) -> dict:
        test = evaluate(model, self.test, self.loss, loss_fn=self.loss_fn)
        train = evaluate(model, self.train, self.loss, loss_fn=self.loss_fn)
        return {
            "test_loss": test.loss,
            "test_accuracy": test.accuracy,
            "train_loss": train.loss,
            "train_accuracy": train.accuracy,
        }

    def batch_loss(self, model: nn.Module, batch) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(model, batch)[0]
        if isinstance(batch, dict):
            return model(**batch).loss
        return self.loss(model(batch[0]), batch[1])


def fine_tune(case: Case, model: nn.Module, masks: dict, steps: int, seed: int = 0):
    """``steps`` optimizer steps on the training mini-batches; pruned weights stay zero."""
    model = copy.deepcopy(model)
    params = dict(model.named_parameters())
    opt = (torch.optim.SGD if case.optimizer == "sgd" else torch.optim.Adam)(
        model.parameters(), lr=case.lr
    )
    order = torch.randperm(len(case.tune_batches), generator=torch.Generator().manual_seed(seed))
    for step in range(steps):
        batch = case.tune_batches[int(order[step % len(order)])]
        opt.zero_grad()
        case.batch_loss(model, batch).backward()
        opt.step()
        with torch.no_grad():
            for name, mask in masks.items():
                params[name].mul_(mask.to(params[name]))
    return model.eval()


def demo_case(name: str) -> Case:
    demo = load_demo(name, holdout=0.2)
    lr = {"digits": 0.05, "tiny-lm": 0.1}[name]
    return Case(
        name=f"{name} demo",
        model=demo.model,
        train=demo.batches(batch_size=256),
        test=demo.test_batches(batch_size=256),
        loss=demo.loss,
        loss_fn=demo.loss_fn,
        tune_batches=demo.batches(batch_size=32),
        lr=lr,
        optimizer="sgd",
    )


# ---------------------------------------------------------------------- small BERT


def _patch_tokens():
    """Digits as 17 tokens: [CLS] and 16 patches of 2x2 pixels, each pixel at 4 levels."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    levels = (torch.tensor(X).reshape(-1, 8, 8) / 17 * 4).long().clamp(0, 3)
    patches = levels.reshape(-1, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, 16, 4)
    tokens = (patches * torch.tensor([1, 4, 16, 64])).sum(-1) + 2  # 0 pad, 1 [CLS]
    ids = torch.cat([torch.ones(len(X), 1, dtype=torch.long), tokens], 1)
    return ids, torch.tensor(y)


def bert_case(steps: int = 1200, seed: int = 0) -> Case:
    """A 2-layer BERT (hidden 32, 4 heads, intermediate 64) on digits as patch tokens, Adam."""
    from transformers import BertConfig, BertForSequenceClassification

    ids, labels = _patch_tokens()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(ids), generator=gen)
    cut = int(0.8 * len(ids))
    config = BertConfig(
        vocab_size=258, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, num_labels=10,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    batch = lambda idx: {"input_ids": ids[idx], "labels": labels[idx]}  # noqa: E731
    train_idx, test_idx = perm[:cut], perm[cut:]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = train_idx[torch.randint(len(train_idx), (32,), generator=gen)]
        opt.zero_grad()
        model(**batch(idx)).loss.backward()
        opt.step()
    model.eval()
    chunks = lambda idx, size: [batch(idx[i : i + size]) for i in range(0, len(idx), size)]  # noqa: E731
    return Case(
        name="small BERT",
        model=model,
        train=chunks(train_idx, 256),
        test=chunks(test_idx, 256),
        loss=None,
        loss_fn=None,
        tune_batches=chunks(train_idx, 32),
        lr=1e-3,
        optimizer="adam",
    )


# ---------------------------------------------------------------------- MLP for item 0


def mlp_case(target: float = 0.067, seed: int = 0) -> Case:
    """A 64-32-10 tanh MLP on the flattened digits, Adam until the training loss <= target."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float64) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[: int(0.8 * len(X))], perm[int(0.8 * len(X)) :]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2000):
        opt.zero_grad()
        loss = F.cross_entropy(model(X[tr]), y[tr])
        if loss.item() <= target:
            break
        loss.backward()
        opt.step()
    model.eval()
    return Case(
        name="digits MLP",
        model=model,
        train=[(X[tr], y[tr])],
        test=[(X[te], y[te])],
        loss=F.cross_entropy,
        loss_fn=None,
        tune_batches=[(X[tr][i : i + 32], y[tr][i : i + 32]) for i in range(0, len(tr), 32)],
        lr=0.05,
        optimizer="sgd",
    )
