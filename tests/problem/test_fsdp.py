"""FSDP2 (fully_shard) models on 2 and 4 gloo processes give the one-process numbers.

Each process holds its rows of every parameter (DTensor shards) and its own, uneven share of
the batches; products, gradients and the algorithms' results, gathered from the local shards,
must equal those of one process with the unsharded model and all the data, to float64
round-off. One spawn per world size runs an MLP, a BERT classifier and a GPT-2 LM.
"""

import functools

import pytest
import torch
import torch.distributed as dist

import hesse
from cases import DT, uneven_mlp
from hf_models import bert_classifier, classifier_batches, gpt2_lm, lm_batches
from ranks import run_ranks

RTOL = 1e-9


def _bert():
    model = bert_classifier(attn="eager", hidden=8, intermediate=12, vocab=20, max_positions=12)
    batches = classifier_batches((3, 2, 2, 1, 2), (5, 7, 4, 6, 3), vocab=20)
    return model, list(model.bert.encoder.layer), batches, {}


def _gpt2():
    model = gpt2_lm(attn="eager", embd=8, vocab=20, positions=12)
    batches = lm_batches((3, 2, 2, 1, 2), (5, 7, 4, 6, 3), vocab=20)
    return model, list(model.transformer.h), batches, {}


MODELS = {"mlp": uneven_mlp, "bert": _bert, "gpt2": _gpt2}


def _numbers(obj, full_vectors, gather):
    """Products and algorithm results of an objective, gathered to full vectors.

    The Lanczos runs stop after a few products: unconverged Ritz values are still functions of
    the start vector and the products, the same on one process and on many.
    """
    V, b = full_vectors
    H, G = hesse.HessianOperator(obj), hesse.GGNOperator(obj)
    local = (lambda t: t) if obj.shard is None else obj.shard.local
    out = {
        "value": obj.value().reshape(1),
        "gradient": gather(obj.gradient()[:, None])[:, 0],
        "Hv": gather(H @ local(V)),
        "Gv": gather(G @ local(V)),
        "Fv": gather(hesse.FisherOperator(obj) @ local(V)),
        "eigs": hesse.eigs(H, k=2, seed=0, max_matvecs=8).values,
        "trace": torch.tensor([hesse.trace(H, budget=6, method="hutch++", seed=0).value]),
    }
    if obj.dim > 100:  # the transformers: products and the two cheapest algorithms
        return out
    out["density"] = hesse.density(H, steps=5, probes=2, seed=0).nodes
    out["solve"] = gather(hesse.solve(G, local(b), damping=0.1).value[:, None])[:, 0]
    blocks = hesse.block_traces(H, budget=4, by="module", seed=0)
    out["blocks"] = torch.tensor([blocks[k].value for k in sorted(blocks)])
    out["power"] = hesse.power_iteration(H, k=1, max_matvecs=5, seed=0).values
    out["dense"] = gather(H.to_dense())  # each process's rows of the full matrix
    fd = hesse.HessianOperator(obj, mode="fd")
    out["Hv_fd"] = gather(fd @ local(V))
    out["fd_error"] = torch.tensor([fd.product_error])
    return out


def _vectors(dim):
    gen = torch.Generator().manual_seed(7)
    return torch.randn(dim, 2, generator=gen, dtype=DT), torch.randn(dim, generator=gen, dtype=DT)


def _work(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for name, build in MODELS.items():
        model, blocks, batches, kwargs = build()
        dim = sum(p.numel() for p in model.parameters())
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        obj = hesse.Objective(model, batches[rank::world], **kwargs)
        assert obj.shard is not None and obj.shard.dim == dim
        results[name] = _numbers(obj, _vectors(dim), obj.shard.gather)
        results[name]["local_dim"] = torch.tensor([obj.dim])
        with pytest.raises(ValueError, match="sharded across processes"):
            hesse.reference.dense_hessian(obj)
        plan = hesse.plan(obj, k=2, steps=3, probes=1)
        # per process: the local dimension, and the largest unit gathered at once
        assert plan.dim == obj.dim and plan.gathered_bytes == obj._gatherer.largest * 8
        assert plan.gathered_bytes < dim * 8 and plan.block_bytes == 4 * 32 * obj.dim * 8
        assert plan.basis_bytes == (plan.ncv + 6) * obj.dim * 8
    dist.barrier()
    return results


@functools.cache
def _reference(name):
    model, _, batches, kwargs = MODELS[name]()
    obj = hesse.Objective(model, batches, **kwargs)
    return obj.dim, _numbers(obj, _vectors(obj.dim), lambda t: t)


def _check(results, world):
    for name in MODELS:
        dim, want = _reference(name)
        assert sum(int(r[name]["local_dim"]) for r in results) == dim, name
        for rank, got in enumerate(results):
            assert got[name].keys() - {"local_dim"} == want.keys()
            for key, value in want.items():
                err = (got[name][key] - value).abs().max().item()
                scale = max(1.0, value.abs().max().item())
                # finite differences divide the round-off of sums in another order by the step
                rtol = RTOL if key not in ("Hv_fd", "fd_error") else 1e-6
                assert err <= rtol * scale, (world, name, rank, key, err)
        if "Hv_fd" in want:  # and the differences are exact products up to their own error
            V = _vectors(dim)[0]
            assert (
                (want["Hv_fd"] - want["Hv"]).norm(dim=0) <= want["fd_error"] * V.norm(dim=0)
            ).all()


@pytest.mark.slow
def test_fsdp_two_processes_match_one(tmp_path):
    _check(run_ranks(functools.partial(_work, world=2), tmp_path, 2), 2)


@pytest.mark.slow
def test_fsdp_four_processes_match_one(tmp_path):
    _check(run_ranks(functools.partial(_work, world=4), tmp_path, 4), 4)
