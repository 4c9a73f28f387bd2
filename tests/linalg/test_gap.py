"""curvature_gap against dense float64 computations of the same numbers."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hesse
from hesse import KFACOperator, Objective, curvature_gap, reference

DT = torch.float64


def _objective():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT).eval()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 3, generator=gen, dtype=DT), torch.randint(0, 3, (10,), generator=gen)
    return Objective(model, [(x[:6], y[:6]), (x[6:], y[6:])], loss=F.cross_entropy)


def _index(space, names):
    sl = space.slices()
    return torch.cat([torch.arange(sl[n].start, sl[n].stop) for n in names])


def test_exact_estimates_match_the_dense_difference():
    obj = _objective()
    K = KFACOperator(obj)
    G, Kd = reference.dense_ggn(obj), K.to_dense()
    gap = curvature_gap(obj, K, k=3, method="exact")
    D = G - Kd
    assert math.isclose(gap.whole.trace.value, float(torch.trace(D)), rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(gap.whole.frobenius.value, float(D.norm()), rel_tol=1e-9)
    assert math.isclose(gap.whole.relative_frobenius, float(D.norm() / G.norm()), rel_tol=1e-9)
    for name, names in obj.space.blocks(by="module").items():
        idx = _index(obj.space, names)
        block = gap.blocks[name]
        assert block.dim == len(idx)
        want = float(D[idx][:, idx].norm())
        assert math.isclose(block.frobenius.value, want, rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(
            block.trace.value, float(torch.trace(D[idx][:, idx])), rel_tol=1e-9, abs_tol=1e-12
        )
    eg, vg = torch.linalg.eigh(G)
    ek, vk = torch.linalg.eigh(Kd)
    want = (ek.flip(0)[:3] - eg.flip(0)[:3]).abs() / eg.flip(0)[:3]
    assert torch.allclose(gap.eigenvalue_errors, want, rtol=1e-6, atol=1e-9)
    angles = hesse.linalg.gap.principal_angles(vg[:, -3:], vk[:, -3:])
    assert torch.allclose(gap.principal_angles, angles, atol=1e-5)
    assert gap.converged and gap.reason == "" and gap.n_matvecs > 0


def test_blocks_where_kfac_is_exact_have_no_gap_but_the_whole_does():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(DT).eval()
    gen = torch.Generator().manual_seed(3)
    x, t = torch.randn(9, 3, generator=gen, dtype=DT), torch.randn(9, 2, generator=gen, dtype=DT)
    obj = Objective(model, (x, t), loss=F.mse_loss)
    gap = curvature_gap(obj, KFACOperator(obj), k=2, method="exact")
    for block in gap.blocks.values():
        assert block.relative_frobenius < 1e-10
        assert abs(block.trace.value) < 1e-10
    assert gap.whole.relative_frobenius > 1e-2  # the off-diagonal blocks KFAC leaves out


def test_stochastic_estimates_carry_error_bars():
    obj = _objective()
    gap = curvature_gap(obj, KFACOperator(obj, "empirical"), k=2, budget=12, seed=3)
    for result in (gap.whole, *gap.blocks.values()):
        for estimate in (result.trace, result.frobenius, result.exact_frobenius):
            assert math.isfinite(estimate.value) and math.isfinite(estimate.stderr)
            assert estimate.ci95[0] <= estimate.value <= estimate.ci95[1]
            assert estimate.n_matvecs <= 12


def test_dense_inputs_and_mismatches():
    A = torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=DT))
    gap = curvature_gap(A, 0.5 * A, k=2, by=None, method="exact")
    assert gap.eigenvalue_errors.tolist() == [0.5, 0.5]
    assert gap.principal_angles.abs().max() < 1e-7
    assert gap.blocks == {}
    with pytest.raises(ValueError, match="the same Objective"):
        curvature_gap(A, torch.eye(2, dtype=DT), k=1, by=None)


def test_gpt2_gap_is_finite():
    pytest.importorskip("transformers")
    from hf_models import gpt2_lm, lm_batches

    model = gpt2_lm(layers=1, embd=8, heads=2, vocab=20, positions=16)
    obj = Objective(model, lm_batches(sizes=(3, 2), lengths=(5, 7), vocab=20))
    K = KFACOperator(obj, "mc")
    gap = curvature_gap(obj, K, k=2, budget=6, tol=1e-4, max_matvecs=80)
    numbers = [gap.whole.trace.value, gap.whole.frobenius.value, gap.whole.relative_frobenius]
    numbers += [b.relative_frobenius for b in gap.blocks.values()]
    assert all(math.isfinite(x) for x in numbers)
    assert torch.isfinite(gap.eigenvalue_errors).all()
    assert torch.isfinite(gap.principal_angles).all()
    assert "transformer.h.0.mlp.c_fc" in gap.blocks
