"""influence() on hard cases, against brute-force float64 references (review of issue 21.2).

A token model (``(n, T)`` ids to ``(n, C, T)`` logits) with ``-100`` labels, uneven batches
from a ``DataLoader``, a query without a counted token, chunks that cut batches, and
``query_rank`` above the query count; plus the refusals and the device option.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from influence_problems import DT, blobs, trained
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hesse.cli import main
from hesse.influence import influence

V, C, E, T = 6, 4, 3, 5
LAM = 0.3


class TokenModel(nn.Module):
    """``(n, T)`` token ids to ``(n, C, T)`` logits: embedding, tanh, linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.lin = nn.Embedding(V, E), nn.Linear(E, C)

    def forward(self, x):
        return self.lin(torch.tanh(self.emb(x))).transpose(1, 2)


def token_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, T), generator=g), torch.randint(0, C, (n, T), generator=g)


def brute_force(model, x, y, xq, yq):
    r"""Dense token scores: :math:`\nabla L_q^\top (H + \lambda I)^{-1} \nabla s_{i,t} / W`.

    The query side is each query's mean over its counted tokens (0 without one).
    """
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def terms(t, xs, ys):
        parts = dict(zip(names, [p.reshape(s) for p, s in zip(
            t.split([s.numel() for s in shapes]), shapes, strict=True)], strict=True))  # fmt: skip
        out = torch.func.functional_call(model, parts, (xs,))
        return F.cross_entropy(out, ys, reduction="none")

    def query_loss(t, xs, ys):  # a query's mean over its counted tokens (0 without one)
        return terms(t, xs, ys).sum() / (ys != -100).sum().clamp_min(1)

    W = (y != -100).sum()
    H = torch.func.hessian(lambda t: terms(t, x, y).sum() / W)(theta)
    grads = torch.stack([torch.func.grad(query_loss)(theta, a[None], b[None])
                         for a, b in zip(xq, yq, strict=True)])  # fmt: skip
    X = torch.linalg.solve(H + LAM * torch.eye(len(theta), dtype=DT), grads.T)
    J = torch.func.jacrev(lambda t: terms(t, x, y))(theta)  # (n, T, d)
    return torch.einsum("ntd,dq->qnt", J, X) / W


def logistic(t, xs, ys):
    """The mean cross-entropy of ``influence_problems.trained``'s model at ``t`` (0 if none)."""
    losses = F.cross_entropy(xs @ t[:9].reshape(3, 3).T + t[9:], ys, reduction="none")
    return losses.sum() / (ys != -100).sum().clamp_min(1)


def sample_grads(t, xs, ys):
    """``(n, 12)`` gradients of each sample's own loss (0 for an ignored one)."""
    rows = zip(xs, ys, strict=True)
    return torch.stack([torch.func.grad(logistic)(t, a[None], b[None]) for a, b in rows])


def test_token_model_loader_padding_chunks_and_ranks_match_brute_force():
    model = TokenModel().to(DT).eval()
    x, y = token_data(11, 1)
    y[0, :2], y[3], y[5, 4] = -100, -100, -100  # a masked prompt, a row of no label
    xq, yq = token_data(3, 2)
    yq[1] = -100  # a query without a counted token: its row is 0
    want = brute_force(model, x, y, xq, yq)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # batches 4, 4, 3
    d = sum(p.numel() for p in model.parameters())
    cap = 2 * 3 * d * 8 + 3 * 11 * 8 + 3 * d * 8  # 3 rows: chunks cut the batches of 4
    r = influence(model, loader, [(xq, yq)], F.cross_entropy, ihvp="exact", damping=LAM,
                  per_token=True, max_memory=cap, query_rank=7)  # fmt: skip
    assert r.chunk_rows == 3 and r.query_rank == 3  # a rank above Q is Q: exact
    assert r.token_scores is not None and r.token_scores.shape == want.shape == (3, 11, 5)
    assert (r.token_scores - want).abs().max() <= 1e-10 * want.abs().max()
    assert (r.scores - want.sum(2)).abs().max() <= 1e-10 * want.abs().max()
    assert (r.scores[1] == 0).all() and (r.token_scores[:, 3] == 0).all()
    assert r.memory["token_scores"] == 3 * 11 * 5 * 8


def test_query_rank_error_is_the_rms_over_all_queries():
    model, x, y, theta = trained(n=30, lam=LAM)
    xq, yq = blobs(4, seed=3)
    yq[2] = -100  # no counted target: a zero column of the inverse products, exact at any rank
    exact = influence(model, [(x, y)], [(xq, yq)], F.cross_entropy, ihvp="exact", damping=LAM)
    r = influence(model, [(x, y)], [(xq, yq)], F.cross_entropy, ihvp="exact", damping=LAM,
                  query_rank=1)  # fmt: skip

    # scores are G X / W; recover each query's X column error from the exact inverse products
    H = torch.func.hessian(logistic)(theta, x, y) + LAM * torch.eye(12, dtype=DT)
    X = torch.linalg.solve(H, sample_grads(theta, xq, yq).T)  # a zero column for query 2
    norms = X.norm(dim=0).clamp_min(1e-300)
    U, S, Vh = torch.linalg.svd(X / norms, full_matrices=False)
    X_1 = (U[:, :1] * S[:1]) @ Vh[:1] * norms
    rel = (X - X_1).norm(dim=0) / norms  # 0 for the zero column
    assert rel[2] == 0 and (rel[[0, 1, 3]] > 1e-3).all()
    assert r.query_rank_error == pytest.approx(float(rel.pow(2).mean().sqrt()), rel=1e-10)
    assert (r.scores[2] == 0).all() and (exact.scores[2] == 0).all()


def test_per_token_refuses_one_target_per_sample():
    model, x, y, _ = trained(n=12, lam=LAM)
    with pytest.raises(ValueError, match="one target per sample"):
        influence(model, [(x, y)], [(x[:2], y[:2])], F.cross_entropy, damping=LAM,
                  per_token=True)  # fmt: skip


def test_device_option_reaches_the_passes_and_a_missing_device_is_refused(tmp_path, capsys):
    model, x, y, _ = trained(n=12, lam=LAM)
    kw = {"ihvp": "exact", "damping": LAM}
    here = influence(model, [(x, y)], [(x[:2], y[:2])], F.cross_entropy, **kw)
    cpu = influence(model, [(x, y)], [(x[:2], y[:2])], F.cross_entropy, device="cpu", **kw)
    assert torch.equal(here.scores, cpu.scores)
    if torch.cuda.is_available():
        return
    argv = ["influence", "--model", "influence_problems:cli_model", "--data",
            "influence_problems:cli_data", "--damping", "0.1", "--quiet", "--device", "cuda",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 2  # before: --device was ignored and the run went on the CPU
    assert "no cuda device" in capsys.readouterr().err


def test_woodbury_computes_the_training_gradients_once(monkeypatch):
    from hesse.influence import _passes

    calls = []
    real = _passes.batch_gradients

    def counted(obj, chunk):
        calls.append(len(chunk[1]))
        return real(obj, chunk)

    monkeypatch.setattr(_passes, "batch_gradients", counted)
    model, x, y, theta = trained(n=20, lam=LAM)
    xq, yq = blobs(3, seed=4)
    r = influence(model, [(x[:8], y[:8]), (x[8:], y[8:])], [(xq, yq)], F.cross_entropy,
                  ihvp="woodbury", damping=LAM)  # fmt: skip
    assert calls == [8, 12]  # one training pass: the scores reuse the Woodbury rows
    G, Gq = sample_grads(theta, x, y), sample_grads(theta, xq, yq)
    fisher = G.T @ G / 20 + LAM * torch.eye(12, dtype=DT)
    want = Gq @ torch.linalg.solve(fisher, G.T) / 20
    assert (r.scores - want).abs().max() <= 1e-10 * want.abs().max()
