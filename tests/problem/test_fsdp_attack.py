"""Attack: FSDP2 curvature against an independent dense float64 Hessian (torch.func.hessian).

One spawn of 2 gloo processes: an MLP with an odd-row layer (uneven shards), an unused Linear
inside a sharded block (no gradient), 3 vs 1 batches per process, class-weighted cross-entropy.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hesse
from ranks import run_ranks

DT = torch.float64


class Block(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.lin = nn.Linear(a, b)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return torch.tanh(self.lin(x))


def _build():
    torch.manual_seed(0)
    model = nn.Sequential(Block(4, 5), nn.Linear(5, 3)).to(DT)
    x, y = torch.randn(12, 4, dtype=DT), torch.randint(0, 3, (12,))
    batches = [(x[0:3], y[0:3]), (x[3:6], y[3:6]), (x[6:9], y[6:9]), (x[9:12], y[9:12])]
    weight = torch.tensor([1.0, 2.0, 0.5], dtype=DT)
    return model, batches, functools.partial(F.cross_entropy, weight=weight), x, y


def _dense():
    model, _, loss, x, y = _build()
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(flat):
        out, i = {}, 0
        for n in names:
            k = params[n].numel()
            out[n] = flat[i : i + k].view_as(params[n])
            i += k
        return loss(torch.func.functional_call(model, out, (x,)), y)

    flat = torch.cat([params[n].reshape(-1) for n in names])
    return torch.func.hessian(f)(flat)


def _work(rank, world=2):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model, batches, loss, _, _ = _build()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    mine = batches[:3] if rank == 0 else batches[3:]
    obj = hesse.Objective(model, mine, loss=loss)
    dim = obj.shard.dim
    V = torch.randn(dim, 2, generator=torch.Generator().manual_seed(1), dtype=DT)
    H = hesse.HessianOperator(obj)
    return {
        "Hv": obj.shard.gather(H @ obj.shard.local(V)),
        "eigs": hesse.eigs(H, k=2, seed=0).values,
        "trace": hesse.trace(H, budget=200, method="hutch++", seed=0).value,
        "V": V,
    }


@pytest.mark.slow
def test_fsdp_attack_matches_dense_hessian(tmp_path):
    results = run_ranks(_work, tmp_path, 2, timeout_s=120)
    Hd = _dense()
    top = torch.linalg.eigvalsh(Hd).flip(0)[:2]
    for r in results:
        want = Hd @ r["V"]
        assert (r["Hv"] - want).abs().max() <= 1e-8 * max(1.0, want.abs().max()), "Hv"
        assert torch.allclose(r["eigs"].sort(descending=True).values, top, rtol=1e-6), "eigs"
        assert abs(r["trace"] - Hd.trace().item()) <= 1e-6 * max(1.0, abs(Hd.trace().item()))
