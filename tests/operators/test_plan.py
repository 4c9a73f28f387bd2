"""The memory plan: its items against the formulas and the operators' own byte counts."""

import importlib
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hesse
from cases import DT, objective, sym_matrix
from hesse.operators import DenseOperator
from hesse.operators.plan import BLOCK_FACTOR, MemoryPlan, MemoryPlanError, plan


def test_items_follow_the_formulas():
    obj = objective("block_ce")  # 3 batches of 4, 4, 2 samples
    d = obj.dim
    p = plan(obj, k=3, steps=12, probes=6, group=2, block_size=8)
    assert (p.dim, p.samples, p.batches, p.curvature) == (d, 10, 3, "hessian")
    assert p.ncv == 20  # eigs' default max(2k + 1, 20)
    assert p.basis_bytes == (20 + 6) * d * 8  # ncv + max(k + 3, 6), the peak of eigs
    assert p.probes_bytes == 13 * 2 * d * 8
    assert p.block_bytes == BLOCK_FACTOR * 8 * d * 8
    assert p.keep_graphs and p.graphs_bytes == 3 * p.graph_bytes > 0
    assert p.max_cache_bytes == p.graphs_bytes
    assert p.total_bytes == p.basis_bytes + p.probes_bytes + p.graphs_bytes + p.block_bytes
    assert p.fits and p.max_memory is None


def test_sizes_are_capped_by_the_dimension():
    obj = objective("linear_mse")  # d = 8
    p = plan(obj, k=2, ncv=50, steps=80)
    assert (p.ncv, p.steps) == (8, 8)
    assert p.basis_bytes == (8 + 6) * 8 * 8


@pytest.mark.parametrize(
    ("curvature", "build"),
    [
        ("hessian", hesse.HessianOperator),
        ("ggn", hesse.GGNOperator),
        ("fisher", hesse.FisherOperator),
    ],
)
def test_graph_estimate_is_what_the_operator_keeps(curvature, build):
    obj = objective("mlp_mse")  # two batches of the same size: the estimate is exact
    p = plan(obj, curvature=curvature)
    op = build(obj)
    op @ torch.ones(obj.dim, dtype=DT)
    assert op.cache_bytes == p.graphs_bytes == 2 * p.graph_bytes


class _Widths(DenseOperator):
    """A dense operator that records how many columns each product has."""

    def __init__(self, matrix):
        super().__init__(matrix)
        self.widths = []

    def _matmat(self, V):
        self.widths.append(V.shape[1])
        return super()._matmat(V)


@pytest.mark.parametrize("per_probes", [1, 3, 8])
def test_default_group_is_the_one_density_takes(monkeypatch, per_probes):
    # density sizes its groups to GROUP_BYTES of basis; shrink it so that it binds here
    obj, steps, probes = objective("mlp_ce"), 5, 8
    d = obj.dim
    room = per_probes * (steps + 1) * d * 8 + 7
    monkeypatch.setattr(importlib.import_module("hesse.operators._memory"), "GROUP_BYTES", room)
    p = plan(obj, steps=steps, probes=probes)
    op = _Widths(sym_matrix(torch.linspace(1, 2, d)))
    hesse.density(op, steps=steps, probes=probes)
    assert p.group == max(op.widths) == per_probes
    assert p.probes_bytes == (steps + 1) * per_probes * d * 8 <= room
    assert f"group={per_probes}," in str(p)


def test_default_group_keeps_the_probe_bases_within_a_gib():
    # 1M parameters: one probe's float64 basis takes 81 * d * 8 = 648 MB, so density takes
    # one probe at a time, and the plan must not count ten (6.5 GB)
    model = nn.Linear(2000, 500).eval()
    data = [(torch.randn(4, 2000), torch.tensor([0, 1, 2, 3]))]
    p = plan(hesse.Objective(model, data, loss=F.cross_entropy), steps=80, probes=10)
    assert (p.dim, p.group) == (1_000_500, 1)
    assert p.probes_bytes == 81 * p.dim * 8 < 2**30


def test_max_memory_lowers_the_group_then_the_block():
    obj = objective("mlp_ce")
    free = plan(obj, k=2, steps=20, probes=8, block_size=16)
    tight = free.total_bytes - free.probes_bytes // 2  # half of the probes must go
    p = plan(obj, k=2, steps=20, probes=8, block_size=16, max_memory=tight)
    assert p.fits and p.total_bytes <= tight and p.max_memory == tight
    assert p.group < 8 and p.block_size == 16 and p.keep_graphs
    no_probes = free.basis_bytes + free.graphs_bytes + free.block_bytes // 2 + 21 * obj.dim * 8
    q = plan(obj, k=2, steps=20, probes=8, block_size=16, max_memory=no_probes)
    assert q.group == 1 and q.block_size < 16 and q.total_bytes <= no_probes


def test_graphs_are_given_up_last():
    obj = objective("block_ce")
    smallest = plan(obj, group=1, block_size=1, basis_dtype=torch.float64)
    cap = smallest.total_bytes - smallest.graphs_bytes + smallest.graph_bytes
    p = plan(obj, max_memory=cap, basis_dtype=torch.float64)
    assert p.fits and not p.keep_graphs
    assert p.graphs_bytes == p.graph_bytes and p.max_cache_bytes == 0


def test_a_fixed_group_is_kept():
    obj = objective("mlp_ce")
    free = plan(obj, probes=8, group=4, basis_dtype=torch.float64)
    p = plan(obj, probes=8, group=4, max_memory=free.total_bytes - 1, basis_dtype=torch.float64)
    assert p.group == 4 and p.block_size < 32


def test_nothing_fits_is_refused_with_the_plan():
    obj = objective("mlp_ce")
    with pytest.raises(MemoryPlanError, match=r"max_memory.*plan: d=") as err:
        plan(obj, max_memory=1000)
    assert isinstance(err.value, ValueError)
    smallest = err.value.plan
    assert isinstance(smallest, MemoryPlan) and not smallest.fits
    assert (smallest.group, smallest.block_size, smallest.keep_graphs) == (1, 1, False)


def test_one_line_and_a_dict_for_the_report():
    p = plan(objective("dict_ce"), k=2)
    line = str(p)
    assert "\n" not in line
    assert line.startswith(f"plan: d={p.dim:,} params, 11 samples in 3 batches; memory ~ ")
    for word in ("basis", "probes", "graphs", "block", "group=10", "block_size=32"):
        assert word in line
    data = p.to_dict()
    assert data["total_bytes"] == p.total_bytes
    assert json.loads(json.dumps(data)) == data


@pytest.mark.parametrize(
    "kwargs",
    [{"curvature": "shampoo"}, {"k": 0}, {"steps": 0}, {"group": 11}, {"block_size": 0}],
)
def test_settings_are_checked(kwargs):
    with pytest.raises(ValueError, match="plan:"):
        plan(objective("mlp_ce"), **kwargs)
