"""Small seeded models for the prune tests: a trained MLP, a tiny transformer, a tiny BERT."""

import torch
import torch.nn.functional as F
from torch import nn

from hesse import Objective
from hesse.demo import tiny_lm


def trained_mlp(steps: int = 50, seed: int = 0):
    """A float64 MLP (5 -> 12 -> 3) trained part-way on a seeded task; (model, data, objective).

    The data come as two uneven batches; the loss stays well above zero, so the Hessian is
    indefinite and the gradient is not zero.
    """
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(120, 8, generator=gen, dtype=torch.float64)
    y = (X[:, :2].sum(1) > 0).long() + (X[:, 2] > 0.5).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    model.eval()
    data = [(X[:70], y[:70]), (X[70:], y[70:])]
    return model, data, Objective(model, data, loss=F.cross_entropy)


def loss_of(model, data) -> float:
    return float(Objective(model, data, loss=F.cross_entropy).value())


def tiny_transformer(seed: int = 0, width: int = 8, heads: int = 2, layers: int = 1):
    """A float64 TinyLM on random token sequences with padding; (model, data, objective)."""
    config = tiny_lm.Config(context=6, width=width, heads=heads, layers=layers, seed=seed)
    torch.manual_seed(seed)
    model = tiny_lm.TinyLM(7, config).double().eval()
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 7, (10, 6), generator=gen)
    targets = torch.randint(0, 7, (10, 6), generator=gen)
    targets[::3, 4:] = tiny_lm.IGNORE
    data = [(tokens[:6], targets[:6]), (tokens[6:], targets[6:])]
    return model, data, Objective(model, data, loss_fn=tiny_lm.token_loss)


def tiny_bert(seed: int = 0):
    """A float64 BertForSequenceClassification from a small config, with dict batches."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=24, max_position_embeddings=16, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config).double().eval()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 30, (8, 7), generator=gen)
    labels = torch.randint(0, 3, (8,), generator=gen)
    mask = torch.ones_like(ids)
    mask[::2, 5:] = 0
    data = [
        {"input_ids": ids[a:b], "attention_mask": mask[a:b], "labels": labels[a:b]}
        for a, b in ((0, 5), (5, 8))
    ]
    return model, data, Objective(model, data)


def zero_units(model, units):
    """A copy of ``model`` with the parameter slices of ``units`` set to zero."""
    import copy

    masked = copy.deepcopy(model)
    params = dict(masked.named_parameters())
    with torch.no_grad():
        for u in units:
            for name, dim, idx in u.slices:
                params[name].index_fill_(dim, torch.tensor(idx), 0.0)
    return masked


def cli_model():
    """``--model prune_cases:cli_model``: the trained MLP in float32."""
    return trained_mlp()[0].float()


def cli_data():
    """``--data prune_cases:cli_data``: its training samples."""
    _, data, _ = trained_mlp()
    return [(x.float(), y) for x, y in data]


def cli_test_data():
    """``--test-data prune_cases:cli_test_data``: fresh samples of the same task."""
    gen = torch.Generator().manual_seed(99)
    X = torch.randn(60, 8, generator=gen)
    return [(X, (X[:, :2].sum(1) > 0).long() + (X[:, 2] > 0.5).long())]
