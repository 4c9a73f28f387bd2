"""hesse.problem._per_sample: per-sample gradients of each sample's term of the objective's sum."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hesse import Objective
from hesse.problem._per_sample import batch_gradients, sample_gradients
from hesse.prune import collect_gradients
from hf_models import gpt2_lm, lm_batches

DT = torch.float64
IGNORE = -100


class Tokens(nn.Module):
    """Per-token logits ``(n, C, T)`` of inputs ``(n, T, f)``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x):
        return self.net(x).transpose(1, 2)


class Keyword(nn.Module):
    """A model called with keyword inputs: ``model(x=...)``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(torch.tanh(x))


def _mlp(outputs: int = 3):
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, outputs))


def _problem(name: str):
    """``(objective, weights (n,))``: a seeded model, uneven batches, a loss and the weights."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, 4, dtype=DT, generator=g)
    y = torch.randint(0, 3, (11,), generator=g)
    if name == "class_weighted":
        c = torch.tensor([1.0, 5.0, 0.2], dtype=DT)
        model, loss, w = _mlp(), nn.CrossEntropyLoss(weight=c), c[y]
    elif name == "tokens":
        x, y = torch.randn(11, 5, 4, dtype=DT, generator=g), torch.randint(0, 3, (11, 5))
        y[torch.rand(11, 5, generator=g) < 0.4] = IGNORE
        y[2] = IGNORE  # no label counted: weight 0
        model, loss, w = Tokens(), F.cross_entropy, (y != IGNORE).sum(1).to(DT)
    elif name == "mse":
        y = torch.randn(11, 2, dtype=DT, generator=g)
        model, loss, w = _mlp(2), F.mse_loss, torch.ones(11, dtype=DT)
    else:  # keyword inputs
        x = {"x": x}
        model, loss, w = Keyword(), F.cross_entropy, torch.ones(11, dtype=DT)
    split = [(_rows(x, slice(0, 7)), y[:7]), (_rows(x, slice(7, 11)), y[7:])]
    return Objective(model.to(DT).eval(), split, loss), w


def _rows(x, index):
    return {k: v[index] for k, v in x.items()} if isinstance(x, dict) else x[index]


def _cat(chunks):
    chunks = list(chunks)
    return [torch.cat([getattr(c, f) for c in chunks]) for f in ("grads", "weights", "losses")]


@pytest.mark.parametrize("name", ["class_weighted", "tokens", "mse", "keyword_inputs"])
def test_vmap_and_loop_agree_and_sum_to_the_gradient(name):
    obj, w = _problem(name)
    G, weights, losses = _cat(sample_gradients(obj, how="vmap"))
    G_loop, weights_loop, losses_loop = _cat(sample_gradients(obj, how="loop"))
    scale = G.abs().max()
    assert (G - G_loop).abs().max() <= 1e-10 * scale
    assert torch.equal(weights, w) and torch.equal(weights_loop, w)
    assert torch.allclose(losses, losses_loop, rtol=0, atol=1e-12)
    # the rows are the gradients of the terms of the sum: their sum over W is the gradient
    assert torch.allclose(G.sum(0) / w.sum(), obj.gradient(), rtol=0, atol=1e-12 * scale)
    if name == "tokens":
        assert torch.equal(G[2], torch.zeros_like(G[2])) and losses[2] == 0


def test_a_hugging_face_lm_falls_back_to_the_loop():
    model, batches = gpt2_lm(), lm_batches()  # default attention: vmap cannot run its masks
    obj = Objective(model, batches)
    G, weights, losses = _cat(sample_gradients(obj))
    # the causal shift: row j counts its labels 1..T-1 that are not -100
    counted = torch.cat([(b["labels"][:, 1:] != IGNORE).sum(1) for b in batches]).to(DT)
    assert torch.equal(weights, counted)
    assert torch.allclose(G.sum(0) / counted.sum(), obj.gradient(), rtol=0, atol=1e-12)
    assert torch.isfinite(losses).all()
    with pytest.raises(RuntimeError, match="vmap"):
        batch_gradients(obj, batches[0], how="vmap")


def test_a_loss_fn_objective_uses_the_loop():
    obj, w = _problem("tokens")

    def loss_fn(model, batch):
        x, y = batch
        counted = (y != IGNORE).sum()
        return F.cross_entropy(model(x), y) if counted else model(x).sum() * 0, counted

    fn = Objective(obj.model, list(obj.batches()), loss_fn=loss_fn)
    G, weights, _ = _cat(sample_gradients(fn))
    want, _, _ = _cat(sample_gradients(obj))
    assert torch.equal(weights, w)
    assert (G - want).abs().max() <= 1e-10 * want.abs().max()
    with pytest.raises(ValueError, match="how='vmap' needs a loss of the model outputs"):
        batch_gradients(fn, next(fn.batches()), how="vmap")


def test_chunks_are_the_sums_of_their_samples():
    obj, w = _problem("class_weighted")
    batch = next(obj.batches())  # 7 samples: chunks of 3, 3 and 1
    rows = batch_gradients(obj, batch, size=3)
    one = batch_gradients(obj, batch)
    for k, part in enumerate((slice(0, 3), slice(3, 6), slice(6, 7))):
        assert torch.allclose(rows.grads[k], one.grads[part].sum(0), rtol=0, atol=1e-13)
        assert rows.weights[k] == w[part].sum()
    # prune's chunk gradient is that of the chunk's own mean loss
    G = collect_gradients(obj, m=None, batch_size=3)
    assert torch.allclose(G[:3], rows.means(), rtol=0, atol=1e-13)


def test_prune_rows_are_the_shared_per_sample_gradients_of_mean_losses():
    obj, w = _problem("tokens")
    G = collect_gradients(obj, m=None)
    rows = _cat(sample_gradients(obj))[0]
    want = rows / torch.where(w > 0, w, 1.0)[:, None]
    assert torch.allclose(G, want, rtol=0, atol=1e-13) and torch.equal(G[2], torch.zeros_like(G[2]))
    picked = collect_gradients(obj, m=4, seed=3)
    assert all(any(torch.equal(p, r) for r in G) for p in picked)


def test_an_unknown_way_is_refused():
    obj, _ = _problem("mse")
    with pytest.raises(ValueError, match="how must be one of"):
        batch_gradients(obj, next(obj.batches()), how="jacobian")
