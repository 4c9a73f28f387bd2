"""FSDP2 products never form a full-size vector, and very uneven data shards do not deadlock.

Each unit's parameters are gathered, differentiably, when the unit runs; the gradients and the
products come out as local shards, summed over the processes by reduce-scatters. A dispatch
mode records every tensor the operations produce while a process computes a gradient and
Hessian, GGN and Fisher products: none may have the full dimension ``D`` (the earlier design
gathered the input columns and the products to ``(D, k)``). Rank 0 holds 4 batches and rank 1
two, one of them with every label ignored, so rank 1 runs 2 zero-weight padding passes and one
zero-weight batch; the numbers must still equal one process's.
"""

import functools

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import hesse
from cases import DT
from hf_models import gpt2_lm, lm_batches
from ranks import run_ranks

RTOL = 1e-9


class _Largest(TorchDispatchMode):
    """The largest number of entries of any tensor an operation produced."""

    def __init__(self):
        super().__init__()
        self.most, self.what = 0, ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.most:
                self.most, self.what = t.numel(), f"{func} -> {tuple(t.shape)}"
        return out


def _setup():
    """GPT-2 and 6 batches, the last with every label ignored (weight 0)."""
    model = gpt2_lm(attn="eager", embd=8, vocab=20, positions=12)
    batches = lm_batches((2, 1, 2, 1, 2), (5, 7, 4, 6, 3), vocab=20)
    ignored = dict(batches[1])
    ignored["labels"] = torch.full_like(ignored["labels"], -100)
    return model, [*batches, ignored]


def _vectors(dim):
    # one column: a local (d, 1) block has fewer entries than D, a gathered one D
    return torch.randn(dim, 1, generator=torch.Generator().manual_seed(5), dtype=DT)


def _products(obj, V):
    ops = [hesse.HessianOperator(obj), hesse.GGNOperator(obj), hesse.FisherOperator(obj)]
    return (
        {"gradient": obj.gradient()[:, None]}
        | {type(op).__name__: op @ V for op in ops}
        | {"kept": ops[0] @ V}
    )


def _work(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model, batches = _setup()
    dim = sum(p.numel() for p in model.parameters())
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # 4 batches and 2, one of weight 0 (its graph must still be a real batch's)
    mine = batches[:4] if rank == 0 else batches[4:]
    obj = hesse.Objective(model, mine)
    V = obj.shard.local(_vectors(dim))
    with _Largest() as seen:
        out = _products(obj, V)
    gathered = {k: obj.shard.gather(v) for k, v in out.items()}
    # a Hessian pass gathers each unit once for all of this process's batches (4 on rank 0,
    # with padding on rank 1): its batches' graphs share one gathered copy
    before, H = obj._gatherer.calls, hesse.HessianOperator(obj)
    H @ V
    shared = obj._gatherer.calls - before
    units = sum(1 for unit in obj._gatherer.units.values() if unit)
    with pytest.raises(ValueError, match="mode='forward'"):  # torch.func: no collectives
        hesse.HessianOperator(obj, mode="forward")
    dist.barrier()
    return {
        "out": gathered,
        "largest": seen.most,
        "what": seen.what,
        "dim": dim,
        "local_dim": obj.dim,
        "unit": obj._gatherer.largest,
        "calls": obj._gatherer.calls,
        "shared": (shared, units),
    }


def test_fsdp_products_stay_local_and_uneven_shards_pad(tmp_path):
    results = run_ranks(functools.partial(_work, world=2), tmp_path, 2)
    model, batches = _setup()
    ref = hesse.Objective(model, batches)
    want = _products(ref, _vectors(ref.dim))
    for rank, got in enumerate(results):
        assert got["dim"] == ref.dim and got["local_dim"] < ref.dim
        # no operation produced a full-size tensor: the largest is a unit's parameters or
        # an activation, far below D (the earlier design gathered (D, k) columns)
        assert got["largest"] < got["dim"], (rank, got["what"], got["dim"])
        assert got["unit"] < got["dim"]
        assert got["shared"][0] == got["shared"][1] > 1, got["shared"]
        for key, value in want.items():
            err = (got["out"][key] - value).abs().max().item()
            assert err <= RTOL * max(1.0, value.abs().max().item()), (rank, key, err)
    # both processes ran the same number of unit gathers (rank 1 padded 2 passes)
    assert results[0]["calls"] == results[1]["calls"] > 0
