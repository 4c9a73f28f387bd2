"""``plan(..., world_size=, basis_dtype=)`` on meta-device models, against hand counts."""

import math

import pytest
import torch
from torch import nn

from hesse import Objective, plan


def _mlp(device: str) -> nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(torch.float64)


def _objective(device: str) -> Objective:
    x = torch.ones(4, 3, dtype=torch.float64, device=device)
    y = torch.zeros(4, 2, dtype=torch.float64, device=device)
    return Objective(_mlp(device), [(x, y)], loss=nn.functional.mse_loss)


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_world_size_counts_rank0_shard(world):
    p = plan(_objective("meta"), k=2, ncv=4, world_size=world, block_size=1, steps=3)
    # fully_shard splits dim 0 in world chunks; rank 0 holds ceil(rows / world) rows
    local = sum(math.ceil(r / world) * c for r, c in ((5, 3), (5, 1), (2, 5), (2, 1)))
    assert p.dim == local
    assert p.gathered_bytes == 32 * 8  # one unit (the root) of all 32 parameters, float64
    assert p.basis_bytes == (4 + 6) * local * 8  # ncv + max(k + 3, 6) vectors
    assert p.block_bytes == 4 * 1 * local * 8  # columns stay local shards


def test_meta_graph_equals_cpu_graph():
    cpu, meta = plan(_objective("cpu"), k=2), plan(_objective("meta"), k=2)
    assert cpu.graph_bytes > 0
    assert meta.graph_bytes == cpu.graph_bytes


def test_basis_dtype_halves_basis():
    obj = _objective("meta")
    f64 = plan(obj, k=3, world_size=2)
    f32 = plan(obj, k=3, world_size=2, basis_dtype=torch.float32)
    assert 2 * f32.basis_bytes == f64.basis_bytes
    assert f32.dim == f64.dim == 3 * 3 + 3 + 5 + 1  # rank 0 of 2


def test_world_size_refuses_nonsense():
    with pytest.raises(ValueError, match="world_size"):
        plan(_objective("meta"), world_size=0)
