"""KFAC and EKFAC of FSDP2 (fully_shard) models on 2 gloo processes equal one process's.

Each process holds its rows of every parameter and its own, uneven, contiguous share of the
batches; the
factors are summed over the processes, and the products, taken on local shards and gathered,
must equal those of the unsharded model with all the data on one process, to float64 round-off.
One spawn runs an MLP (exact and Monte-Carlo KFAC, EKFAC) and a GPT-2 LM (Conv1D layers, a tied
embedding, LayerNorm's exact blocks).
"""

import functools

import pytest
import torch
import torch.distributed as dist

import hesse
from cases import DT, uneven_mlp
from hf_models import gpt2_lm, lm_batches
from ranks import run_ranks

RTOL = 1e-10
WORLD = 2


def _gpt2():
    model = gpt2_lm(attn="eager", embd=8, vocab=20, positions=12).to(DT)
    batches = lm_batches((3, 2, 2, 1, 2), (5, 7, 4, 6, 3), vocab=20)
    return model, list(model.transformer.h), batches, {}


# (model, operator, settings): what each run builds
RUNS = {
    "mlp-kfac": (uneven_mlp, hesse.KFACOperator, {}),
    "mlp-kfac-mc": (uneven_mlp, hesse.KFACOperator, {"kind": "mc", "mc_samples": 2, "seed": 1}),
    "mlp-ekfac": (uneven_mlp, hesse.EKFACOperator, {"approx": "reduce"}),
    "gpt2-kfac": (_gpt2, hesse.KFACOperator, {"kind": "empirical"}),
}


def _numbers(op, V, shard):
    """Products, inverse products, trace and spectrum of a Kronecker operator, as full tensors.

    ``shard``: the objective's ``Shard`` (None on one process): products take its local rows.
    """
    first = op.space.names[0]
    sub = None if shard is None else shard.subset([first])
    n = op.restrict([first]).shape[0] if sub is None else sub.dim

    def product(A, W, part):
        return A @ W if part is None else part.gather(A @ part.local(W))

    return {
        "Kv": product(op, V, shard),
        "Kinv_v": product(op.inverse(damping=0.1), V, shard),
        "trace": torch.tensor([op.trace()]),
        "eigenvalues": op.eigenvalues()[:6],
        "restricted": product(op.restrict([first]), V[:n], sub),
    }


def _vectors(dim):
    return torch.randn(dim, 3, generator=torch.Generator().manual_seed(7), dtype=DT)


def _work(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for name, (build, cls, kwargs) in RUNS.items():
        model, blocks, batches, loss = build()
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        # contiguous, uneven shares (3 and 2 batches): Monte-Carlo draws follow sample positions
        mine = batches[:3] if rank == 0 else batches[3:]
        obj = hesse.Objective(model, mine, **loss)
        assert obj.shard is not None
        op = cls(obj, **kwargs)
        assert op.shape[0] == obj.dim < obj.shard.dim
        results[name] = _numbers(op, _vectors(obj.shard.dim), obj.shard)
        # the factors' bytes follow the full layers, counted without gathering
        results[name]["factor_bytes"] = torch.tensor([float(cls.factor_bytes(obj))])
        results[name]["local_dim"] = torch.tensor([obj.dim])
    dist.barrier()
    return results


@functools.cache
def _reference(name):
    build, cls, kwargs = RUNS[name]
    model, _, batches, loss = build()
    obj = hesse.Objective(model, batches, **loss)
    op = cls(obj, **kwargs)
    out = _numbers(op, _vectors(op.shape[0]), None)
    out["factor_bytes"] = torch.tensor([float(cls.factor_bytes(obj))])
    return op.shape[0], out


@pytest.mark.slow
def test_kronecker_factors_of_a_sharded_model_equal_one_process(tmp_path):
    results = run_ranks(functools.partial(_work, world=WORLD), tmp_path, WORLD)
    for name in RUNS:
        dim, want = _reference(name)
        assert sum(int(r[name]["local_dim"]) for r in results) == dim, name
        for rank, got in enumerate(results):
            for key, value in want.items():
                err = (got[name][key] - value).abs().max().item()
                scale = max(1.0, value.abs().max().item())
                assert err <= RTOL * scale, (name, rank, key, err)
