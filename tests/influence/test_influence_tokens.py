"""Per-token influence on a tiny GPT-2, against per-token gradients by brute force (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
from hesse.influence import influence  # noqa: E402
from hf_models import gpt2_lm, lm_batches, lm_token_count  # noqa: E402

DT = torch.float64
PARAMS = ["transformer.h.0.mlp.c_proj.weight", "transformer.h.0.mlp.c_proj.bias"]
LAM = 2.0


def tiny():
    model = gpt2_lm(attn="eager", layers=1, embd=8, heads=2, vocab=20, positions=16)
    train = lm_batches((3, 2), (5, 7), vocab=20)
    queries = lm_batches((2,), (6,), vocab=20, seed=3)
    return model, train, queries


def token_losses(model, params, batch):
    """``(n, T - 1)`` next-token cross-entropies (0 on ignored labels), differentiable."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    z = torch.func.functional_call(model, params, (), inputs).logits[:, :-1]
    y = batch["labels"][:, 1:]
    return F.cross_entropy(z.transpose(1, 2), y, reduction="none", ignore_index=-100)


def brute_force(model, train, queries):
    """Dense Hessian, query gradients and per-token gradients over PARAMS, all by autograd."""
    named = dict(model.named_parameters())
    theta = {n: named[n].detach().clone() for n in PARAMS}
    sizes = [theta[n].numel() for n in PARAMS]

    def split(flat):
        return {
            n: t.reshape(theta[n].shape) for n, t in zip(PARAMS, flat.split(sizes), strict=True)
        }

    W = sum(lm_token_count(b) for b in train)

    def mean_loss(flat):
        return sum(token_losses(model, split(flat), b).sum() for b in train) / W

    def sequence_loss(f, row, count):
        return token_losses(model, split(f), row).sum() / count

    def one_token(f, row, t):
        return token_losses(model, split(f), row)[0, t - 1]

    flat = torch.cat([theta[n].reshape(-1) for n in PARAMS])
    H = torch.func.hessian(mean_loss)(flat)
    grads = []
    for b in queries:
        for j in range(len(b["labels"])):
            row = {k: v[j : j + 1] for k, v in b.items()}
            count = lm_token_count(row)
            grads.append(torch.func.grad(sequence_loss)(flat, row, count))
    X = torch.linalg.solve(H + LAM * torch.eye(len(flat), dtype=DT), torch.stack(grads).T)
    tokens = []  # (n, T) per training sequence: g_{i,t} . X / W
    longest = max(b["input_ids"].shape[1] for b in train)
    for b in train:
        for j in range(len(b["labels"])):
            row = {k: v[j : j + 1] for k, v in b.items()}
            out = torch.zeros(X.shape[1], longest, dtype=DT)
            for t in range(1, row["labels"].shape[1]):
                if row["labels"][0, t] == -100:
                    continue
                g = torch.func.grad(one_token)(flat, row, t)
                out[:, t] = g @ X / W
            tokens.append(out)
    return torch.stack(tokens, 1)


def test_token_scores_equal_per_token_gradients_and_sum_to_the_sequence_scores():
    model, train, queries = tiny()
    r = influence(model, train, queries, ihvp="exact", damping=LAM, params=PARAMS, per_token=True)
    want = brute_force(model, train, queries)
    assert r.token_scores is not None and r.token_scores.shape == want.shape == (2, 5, 7)
    assert (r.token_scores - want).abs().max() <= 1e-9 * want.abs().max()
    # a sequence's score is the sum over its counted tokens
    assert torch.allclose(r.token_scores.sum(2), r.scores, rtol=1e-10, atol=1e-14)
    assert (r.token_scores[:, :, 0] == 0).all()  # position 0 is predicted by nothing
    assert (r.token_scores[:, 0, :2] == 0).all()  # row 0's first two labels are ignored
    # the weights are the counted tokens of each sequence (shifted labels not -100)
    counts = [
        int((b["labels"][j, 1:] != -100).sum()) for b in train for j in range(len(b["labels"]))
    ]
    assert r.train_weights.tolist() == counts


def test_per_token_refuses_a_loss_without_token_terms():
    x, y = torch.randn(6, 3, dtype=DT), torch.arange(6) % 2
    model = torch.nn.Linear(3, 2).double().eval()
    with pytest.raises(ValueError, match="per-token scores need a token cross-entropy"):
        influence(model, [(x, y.double()[:, None])], [(x[:1], y.double()[:1, None])],
                  F.mse_loss, damping=0.1, per_token=True)  # fmt: skip
