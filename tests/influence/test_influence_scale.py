"""influence() at scale: low-rank queries, memory-planned chunks, progress, LoRA parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from influence_problems import DT, blobs, mean_loss, trained
from torch import nn

from hesse.influence import influence
from hesse.influence._passes import memory_bytes

LAM = 0.1


@pytest.fixture(scope="module")
def problem():
    model, x, y, theta = trained(n=60, lam=LAM)
    xq, yq = blobs(8, seed=5)
    return model, x, y, theta, xq, yq


def inverse_products(theta, x, y, xq, yq):
    r"""Dense ``(d, Q)`` :math:`(H + \lambda I)^{-1} \nabla L_q` and ``(n, d)`` gradients."""
    H = torch.func.hessian(lambda t: mean_loss(t, x, y, 3))(theta)

    def rows(xs, ys):
        return torch.stack(
            [
                torch.func.grad(mean_loss)(theta, a[None], b[None], 3)
                for a, b in zip(xs, ys, strict=True)
            ]
        )

    X = torch.linalg.solve(H + LAM * torch.eye(len(theta), dtype=DT), rows(xq, yq).T)
    return X, rows(x, y)


def test_query_rank_is_the_truncated_svd_of_the_inverse_products(problem):
    model, x, y, theta, xq, yq = problem
    X, G = inverse_products(theta, x, y, xq, yq)
    norms = X.norm(dim=0)  # each query's column normalized before the SVD
    U, S, Vh = torch.linalg.svd(X / norms, full_matrices=False)
    exact = influence(model, [(x, y)], [(xq, yq)], F.cross_entropy, ihvp="exact", damping=LAM)
    errors = []
    for r in (1, 2, 4, 8):
        got = influence(
            model, [(x, y)], [(xq, yq)], F.cross_entropy, ihvp="exact", damping=LAM, query_rank=r
        )
        X_r = (U[:, :r] * S[:r]) @ Vh[:r] * norms
        want = G @ X_r / len(y)
        assert (got.scores - want.T).norm() <= 1e-10 * want.norm()
        assert got.query_rank == r
        # the RMS over queries of each one's relative error
        rel = ((X - X_r).norm(dim=0) / norms).pow(2).mean().sqrt()
        assert got.query_rank_error == pytest.approx(float(rel), abs=1e-10)
        errors.append(float((got.scores - exact.scores).norm() / exact.scores.norm()))
    assert errors[-1] <= 1e-12  # r = Q: the exact scores
    assert errors[0] > 1e-3 and errors == sorted(errors, reverse=True)
    with pytest.raises(ValueError, match="query_rank must be >= 1"):
        influence(model, [(x, y)], [(xq, yq)], F.cross_entropy, damping=LAM, query_rank=0)


@pytest.mark.parametrize("ihvp", ["cg", "woodbury", "projected"])
def test_memory_planned_chunks_give_the_same_scores(problem, ihvp):
    model, x, y, theta, xq, yq = problem
    kw = {"ihvp": ihvp, "damping": LAM, "projection_dim": 8}
    batches = [(x[:40], y[:40]), (x[40:], y[40:])]
    whole = influence(model, batches, [(xq, yq)], F.cross_entropy, **kw)
    d, q, n = 12, 8, 60
    # projected: the k x k solve, one block of P, the (n + q) projected rows, the scores
    fixed = (
        2 * q * d * 8 + q * n * 8
        if ihvp != "projected"
        else (2 * 64 + 8 * (1 << 15) + 68 * 8 + q * n) * 8
    )
    rows = n if ihvp == "woodbury" else 7
    cap = fixed + rows * d * 8
    chunked = influence(model, batches, [(xq, yq)], F.cross_entropy, max_memory=cap, **kw)
    assert whole.chunk_rows == 40 and chunked.chunk_rows == min(rows, 40)
    assert (chunked.scores - whole.scores).norm() <= 1e-12 * whole.scores.norm()
    with pytest.raises(ValueError, match="cannot hold"):
        influence(model, batches, [(xq, yq)], F.cross_entropy, max_memory=fixed, **kw)


def test_max_memory_sizes_and_the_refusal_message(problem):
    model, x, y, theta, xq, yq = problem
    assert memory_bytes("2GB") == 2 * 10**9 and memory_bytes("1.5GiB") == 3 * 2**29
    assert memory_bytes(" 500m ") == 5 * 10**8 and memory_bytes(None) is None
    with pytest.raises(ValueError, match="not a positive size"):
        memory_bytes("lots")
    with pytest.raises(ValueError, match="one per-sample gradient .12 numbers"):
        influence(model, [(x, y)], [(xq, yq)], F.cross_entropy, damping=LAM, max_memory="1K")
    with pytest.raises(ValueError, match="all 60 per-sample gradients"):
        influence(
            model, [(x, y)], [(xq, yq)], F.cross_entropy, ihvp="woodbury", damping=LAM,
            max_memory=3000,
        )  # fmt: skip


def test_progress_bar_counts_training_samples(problem, capsys):
    model, x, y, theta, xq, yq = problem
    influence(model, [(x[:30], y[:30]), (x[30:], y[30:])], [(xq, yq)], F.cross_entropy,
              damping=LAM, progress=True)  # fmt: skip
    err = capsys.readouterr().err
    # a bar over the 60 training samples, with the elapsed<remaining time (tqdm's ETA)
    assert "influence: training points" in err and "/60 [00:00<" in err and "sample/s" in err


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(x))``: a frozen-in-spirit linear layer with a rank-r update."""

    def __init__(self, fan_in: int, fan_out: int, rank: int, g: torch.Generator):
        super().__init__()
        self.base = nn.Linear(fan_in, fan_out).to(DT)
        self.lora_A = nn.Parameter(0.5 * torch.randn(rank, fan_in, generator=g, dtype=DT))
        self.lora_B = nn.Parameter(0.5 * torch.randn(fan_out, rank, generator=g, dtype=DT))

    def forward(self, x):
        return self.base(x) + x @ self.lora_A.T @ self.lora_B.T


def test_lora_parameters_only():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(3, 5, 2, g), nn.Tanh(), LoRALinear(5, 3, 2, g)).eval()
    x, y = blobs(40, seed=2)
    xq, yq = blobs(4, seed=7)
    names = ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    damping = 2.0  # far from a minimum: enough to make the Hessian positive definite
    r = influence(model, [(x, y)], [(xq, yq)], F.cross_entropy, ihvp="exact", damping=damping,
                  params="*.lora_*")  # fmt: skip
    named = dict(model.named_parameters())
    theta = torch.cat([named[n].detach().reshape(-1) for n in names])
    shapes = [named[n].shape for n in names]

    def loss(t, xs, ys):
        parts = dict(zip(names, [p.reshape(s) for p, s in zip(
            t.split([s.numel() for s in shapes]), shapes, strict=True)], strict=True))  # fmt: skip
        return F.cross_entropy(torch.func.functional_call(model, parts, (xs,)), ys)

    H = torch.func.hessian(lambda t: loss(t, x, y))(theta) + damping * torch.eye(
        len(theta), dtype=DT
    )

    def rows(xs, ys):
        return torch.stack(
            [torch.func.grad(loss)(theta, a[None], b[None]) for a, b in zip(xs, ys, strict=True)]
        )

    want = rows(xq, yq) @ torch.linalg.solve(H, rows(x, y).T) / len(y)
    assert len(theta) == 2 * (3 + 5) + 2 * (5 + 3)  # the base layers are held fixed
    assert (r.scores - want).norm() <= 1e-10 * want.norm()
