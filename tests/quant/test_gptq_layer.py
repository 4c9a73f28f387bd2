"""GPTQ's layer sweep against a straightforward float64 reference (same codes), and vs RTN."""

from __future__ import annotations

import pytest
import torch

from hesse.quant._gptq_layer import gptq_layer


def _grid(Wg: torch.Tensor, bits: int, symmetric: bool, full: bool = False):
    """(scale, zero) of each row of a group, scales rounded to float32 as stored."""
    if symmetric:
        L = 2 ** (bits - 1) - 1
        s = Wg.abs().amax(1) / (L + 0.5 if full else L)
        z = torch.zeros_like(s)
    else:
        lo, hi = Wg.amin(1).clamp(max=0), Wg.amax(1).clamp(min=0)
        s = (hi - lo) / (2**bits - 1)
        z = torch.round(-lo / torch.where(s > 0, s, torch.ones_like(s)))
    s = s.float().double()
    return torch.where(s > 0, s, torch.ones_like(s)), z


def reference(W, H, bits, group, symmetric, act_order, damping=0.01, full=False):
    """GPTQ as in the paper's Algorithm 1, no lazy blocks: every update hits all later columns."""
    W = W.clone().double()
    out, n = W.shape
    group = group or n
    lo, hi = (-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    lo = -(2 ** (bits - 1)) if full else lo
    Hd = H.clone().double()
    Hd.diagonal()[Hd.diagonal() == 0] = 1
    perm = (
        torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(n)
    )
    Hp = Hd[perm][:, perm] + damping * Hd.diagonal().mean() * torch.eye(n, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(Hp), upper=True)
    grids = [_grid(W[:, g : g + group], bits, symmetric, full) for g in range(0, n, group)]
    Wp = W[:, perm]
    Q = torch.zeros_like(Wp)
    for j in range(n):
        c = int(perm[j])
        if not act_order and c % group == 0:
            grids[c // group] = _grid(Wp[:, j : j + group], bits, symmetric, full)
        s, z = grids[c // group]
        Q[:, j] = torch.round(Wp[:, j] / s + z).clamp(lo, hi)
        err = (Wp[:, j] - s * (Q[:, j] - z)) / U[j, j]
        Wp[:, j:] -= torch.outer(err, U[j, j:])
    codes = torch.empty_like(Q)
    codes[:, perm] = Q
    return codes


def _layer(seed: int, out: int = 12, n: int = 32, samples: int = 200):
    """A weight and the Hessian of strongly correlated inputs (some inputs dead, some tiny)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.rand(n, generator=g) ** 3
    X = mix @ torch.randn(n, samples, generator=g, dtype=torch.float64)
    X[3] = 0.0
    X[5] *= 1e-3
    W = torch.randn(out, n, generator=g, dtype=torch.float64)
    return W, 2 * X @ X.T / samples


@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits,group", [(3, 8), (4, None), (2, 16)])
def test_codes_equal_reference(act_order, symmetric, bits, group, full):
    W, H = _layer(bits + 10 * symmetric + 100 * act_order)
    r = gptq_layer(W, H, bits=bits, group_size=group, symmetric=symmetric, act_order=act_order,
                   block=5, full_range=full)  # fmt: skip
    want = reference(W, H, bits, group, symmetric, act_order, full=full and symmetric)
    assert r.error <= r.rtn_error and r.rule == "gptq"
    rows = r.codes.q.reshape(W.shape)
    assert torch.equal(rows, want), (rows != want).sum()
    D = W - r.weight
    assert r.error == pytest.approx(float(torch.einsum("ri,ij,rj->", D, H, D)), rel=1e-12)


@pytest.mark.parametrize("act_order", [False, True])
def test_full_range_is_the_default_grid(act_order):
    W, H = _layer(31)
    r = gptq_layer(W, H, bits=4, group_size=8, act_order=act_order, block=5)
    want = reference(W, H, 4, 8, True, act_order, full=True)
    assert r.rule == "gptq" and torch.equal(r.codes.q.reshape(W.shape), want)
    assert r.codes.lo == -8 and int(r.codes.q.min()) == -8  # the extra negative code is used
    narrow = gptq_layer(W, H, bits=4, group_size=8, act_order=act_order, full_range=False)
    assert narrow.codes.lo == -7 and not torch.equal(narrow.codes.q, r.codes.q)


def test_beats_round_to_nearest_and_says_so():
    errors = []
    for seed in range(6):
        W, H = _layer(seed, out=16, n=64)
        r = gptq_layer(W, H, bits=3, group_size=16)
        assert r.error <= r.rtn_error
        errors.append((r.error, r.rtn_error, r.rule))
    assert sum(e < 0.8 * rtn for e, rtn, rule in errors if rule == "gptq") >= 4, errors


def test_conv1d_axis_and_conv_kernel_match_rows():
    W, H = _layer(7, out=6, n=32)
    a = gptq_layer(W, H, bits=4, group_size=8)
    b = gptq_layer(W.T.contiguous(), H, bits=4, group_size=8, axis=1)  # HF Conv1D: (in, out)
    assert torch.equal(b.weight, a.weight.T)
    c = gptq_layer(W.reshape(6, 2, 4, 4), H, bits=4, group_size=8)  # conv (out, C, k, k)
    assert torch.equal(c.weight.reshape(6, 32), a.weight)


def test_refusals():
    W, H = _layer(0, n=32)
    with pytest.raises(ValueError, match="divide"):
        gptq_layer(W, H, group_size=12)
    with pytest.raises(ValueError, match="H must be"):
        gptq_layer(W, H[:4, :4])
    with pytest.raises(ValueError, match="damping"):
        gptq_layer(W, H, damping=0.0, group_size=8)
    with pytest.raises(ValueError, match="bits"):
        gptq_layer(W, H, bits=1, group_size=8)
