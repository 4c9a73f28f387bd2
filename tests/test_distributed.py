"""Two gloo processes, each with half of the batches, give the single-process numbers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hesse
from cases import DT
from ranks import run_ranks

WORLD = 2


def _problem():
    """An MLP and 4 batches (4, 4, 4, 3 samples): the two ranks hold 8 and 7 samples."""
    torch.manual_seed(40)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT).eval()
    x, y = torch.randn(15, 4, dtype=DT), torch.randint(0, 3, (15,))
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 15, 4)]
    return model, batches


def _numbers(obj):
    op = hesse.HessianOperator(obj)
    e = hesse.eigs(op, k=3, seed=0)
    t = hesse.trace(op, budget=30, method="hutch++", seed=0)
    s = hesse.density(op, steps=10, probes=3, seed=0)
    return {
        "eigs": e.values.to(DT),
        "trace": torch.tensor([t.value, t.stderr], dtype=DT),
        "nodes": torch.as_tensor(s.nodes, dtype=DT),
        "weights": torch.as_tensor(s.weights, dtype=DT),
        "value": obj.value().detach().to(DT).reshape(1),
    }


def _work(rank):
    model, batches = _problem()
    shard = batches[2 * rank : 2 * rank + 2]
    return _numbers(hesse.Objective(model, shard, loss=F.cross_entropy))


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    results = run_ranks(_work, tmp_path, WORLD)
    model, batches = _problem()
    want = _numbers(hesse.Objective(model, batches, loss=F.cross_entropy))
    for rank, got in enumerate(results):
        for key, value in want.items():
            assert got[key].shape == value.shape, (rank, key)
            err = (got[key] - value).abs().max().item()
            assert err <= 1e-6 * max(1.0, value.abs().max().item()), (rank, key, err)
