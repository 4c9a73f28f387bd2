"""Kronecker factors in the memory plan: counted from the shapes, never built, refused by name."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hesse
from hesse.analysis import prepare
from hesse.operators import kfac
from hesse.operators.plan import EIGH_ENTRIES, MemoryPlanError, plan

VOCAB = 5000  # the head's output factor: 5000 x 5000 float32 = 100 MB


@pytest.fixture
def wide_head(monkeypatch):
    """An objective whose head has a 100 MB output factor; building any factor fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the plan built Kronecker factors")

    monkeypatch.setattr(kfac._Kronecker, "__init__", refuse)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, VOCAB)).eval()
    x, y = torch.randn(4, 8), torch.randint(0, VOCAB, (4,))
    return hesse.Objective(model, [(x, y)], loss=F.cross_entropy)


SMALL = {"k": 2, "steps": 4, "probes": 1}
LOW = {"k_smallest": 2, "steps": 4, "probes": 1}


def test_planned_factor_bytes_are_the_operators_count(wide_head):
    p = plan(wide_head, curvature="kfac", **SMALL)
    assert p.factor_bytes == hesse.KFACOperator.factor_bytes(wide_head)
    assert p.factor_bytes == 4 * (VOCAB**2 + 17**2 + 16**2 + 9**2)
    assert p.total_bytes == p.basis_bytes + p.probes_bytes + p.graphs_bytes + p.block_bytes + (
        p.factor_bytes
    )
    assert p.largest_factor == "layer 2: output factor 5,000 x 5,000 (100.0 MB)"
    assert "factors 100.0 MB" in str(p)
    # EKFAC: KFAC's factors, its own eigenbases and scalings, the float64 eigh of the largest
    q = plan(wide_head, curvature="ekfac", **SMALL)
    own = hesse.EKFACOperator.factor_bytes(wide_head)
    assert q.factor_bytes == p.factor_bytes + own + EIGH_ENTRIES * 8 * VOCAB**2


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "fisher"])
def test_exact_curvatures_plan_no_factors(wide_head, curvature):
    p = plan(wide_head, curvature=curvature, **SMALL)
    assert (p.factor_bytes, p.largest_factor) == (0, "") and "factors" not in str(p)


def test_factors_above_max_memory_are_refused_naming_the_largest(wide_head):
    with pytest.raises(MemoryPlanError) as err:
        plan(wide_head, curvature="kfac", max_memory=50_000_000, **SMALL)
    message = str(err.value)
    assert "The KFAC factors alone take 100.0 MB" in message
    assert "layer 2: output factor 5,000 x 5,000 (100.0 MB)" in message
    assert "(params=)" in message and 'curvature="ggn"' in message
    assert not err.value.plan.fits and err.value.plan.factor_bytes > 50_000_000
    # the same objective fits with the exact GGN's products, and the factors fit a larger cap
    assert plan(wide_head, curvature="ggn", max_memory=50_000_000, **SMALL).fits
    fits = plan(wide_head, curvature="kfac", max_memory=400_000_000, **SMALL)
    assert fits.fits and fits.total_bytes <= 400_000_000


def test_analyze_refuses_before_any_factor_is_built(wide_head):
    with pytest.raises(MemoryPlanError, match="layer 2: output factor 5,000 x 5,000"):
        prepare(wide_head, curvature="kfac", max_memory=50_000_000, k=2, budget=12, **LOW)


@pytest.mark.parametrize(("width", "found"), [(70, "exact block 140 x 140"), (2100, None)])
def test_blocks_no_factor_covers_are_planned_or_refused(width, found):
    model = nn.Sequential(nn.Linear(4, width), nn.LayerNorm(width), nn.Linear(width, 2)).eval()
    obj = hesse.Objective(model, [(torch.randn(3, 4), torch.tensor([0, 1, 0]))], F.cross_entropy)
    if found is not None:  # the LayerNorm's exact 140 x 140 block is the largest item
        assert plan(obj, curvature="kfac").largest_factor.startswith(f"layer 1: {found}")
        return
    with pytest.raises(ValueError, match=r"module\(s\) 1 \(LayerNorm\) hold 4200"):
        plan(obj, curvature="kfac")  # above max_dense: the operator's own refusal, before a pass
