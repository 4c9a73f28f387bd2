"""A product writes each batch's columns into one buffer and reuses it for later batches."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

import hesse


def _problem():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    sizes = (5, 3, 7, 4)  # uneven batches: the weights matter
    xs = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in sizes]
    ys = [torch.randint(0, 2, (n,), generator=g) for n in sizes]
    return model, list(zip(xs, ys, strict=True))


def _dense(model, batches):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])

    def loss(v):
        parts, params = torch.split(v, [s.numel() for s in shapes]), {}
        for n, p, s in zip(names, parts, shapes, strict=True):
            params[n] = p.reshape(s)
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return hessian(loss)(flat)


@pytest.mark.parametrize("cache", ["auto", 0])
def test_products_over_many_batches_and_chunks(cache):
    model, batches = _problem()
    obj = hesse.Objective(model, batches, loss=nn.functional.cross_entropy)
    op = hesse.HessianOperator(obj, block_size=2, max_cache_bytes=cache)
    H = _dense(model, batches)
    V = torch.randn(H.shape[0], 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    first, second = op @ V, op @ V  # the second through kept graphs when cache="auto"
    assert (op.cache_bytes > 0) == (cache == "auto")
    torch.testing.assert_close(first, H @ V, rtol=1e-10, atol=1e-12)
    assert torch.equal(first, second)
    # each column alone: the same numbers (columns do not leak into each other's buffers)
    single = torch.stack([op @ V[:, j] for j in range(V.shape[1])], 1)
    torch.testing.assert_close(single, first, rtol=1e-12, atol=1e-14)
    # the input is left as it was
    assert torch.equal(
        V,
        torch.randn(H.shape[0], 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
    )
