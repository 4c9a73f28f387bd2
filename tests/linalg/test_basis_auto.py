"""The basis dtype eigs and plan choose: float32 for large float32 operators, bounds honest."""

import pytest
import torch

import hesse
from cases import CASES, DT, objective, sym_matrix
from hesse.linalg._util import Counted, chunk_rows
from hesse.operators._memory import FLOAT32_BASIS_FROM, auto_basis_dtype
from hesse.operators.plan import plan

F32 = torch.float32
EPS32 = torch.finfo(F32).eps


def _outliers_over_bulk(d=200, seed=1):
    bulk = torch.rand(d - 3, generator=torch.Generator().manual_seed(seed), dtype=DT) * 2e-4
    return torch.cat([torch.tensor([1.0, 0.5, 0.2], dtype=DT), bulk])


def _clustered_top_ten(d=300, seed=2):
    top = 10.0 * (1 - 1e-3 * torch.arange(10, dtype=DT))
    rest = torch.rand(d - 10, generator=torch.Generator().manual_seed(seed), dtype=DT) * 10 - 5
    return torch.cat([top, rest])


@pytest.mark.parametrize(
    ("spectrum", "k", "which"),
    [
        (_outliers_over_bulk, 3, "largest"),
        (_outliers_over_bulk, 3, "smallest"),
        (_clustered_top_ten, 10, "largest"),
    ],
)
def test_float32_basis_gives_honest_bounds(spectrum, k, which):
    evals = spectrum()
    A = sym_matrix(evals, seed=0).to(F32)
    exact = A.double()
    true_evals = torch.linalg.eigvalsh(exact)
    norm = float(true_evals.abs().max())
    want = {"largest": true_evals.flip(0), "smallest": true_evals}[which][:k]
    r = hesse.eigs(A, k=k, which=which, basis_dtype=F32)
    assert r.basis_dtype == F32 and r.converged, r.reason
    assert hesse.eigs(A, k=k, which=which).basis_dtype == DT  # small: float64 by default
    assert (r.values - want).abs().max() <= 16 * EPS32 * norm
    X = r.vectors.double()
    true = (exact @ X - X * r.values).norm(dim=0)
    assert (true <= r.residuals + 4 * EPS32 * norm).all(), (true, r.residuals)
    ref = hesse.eigs(A, k=k, which=which, basis_dtype=DT)  # same accuracy as float64 storage
    assert ref.basis_dtype == DT
    assert (r.values - ref.values).abs().max() <= 16 * EPS32 * norm


def test_float64_operator_keeps_float64_basis():
    r = hesse.eigs(sym_matrix(_outliers_over_bulk(), seed=0), k=2)
    assert r.basis_dtype == DT


def test_float32_basis_only_where_its_round_off_leaves_room_in_tol():
    tol = 8 * EPS32
    big = -(-FLOAT32_BASIS_FROM // (8 * 23))  # a float64 basis of 23 vectors reaches it
    assert auto_basis_dtype(F32, 23, tol, dim=big) == F32
    assert auto_basis_dtype(F32, 23, tol, dim=big - 1) == DT  # small: memory does not matter
    assert auto_basis_dtype(DT, 23, 1e-10, dim=10 * big) == DT
    assert auto_basis_dtype(F32, 23, tol) == F32  # k = 10 at the default ncv
    assert auto_basis_dtype(F32, 37, tol) == F32  # k = 17
    assert auto_basis_dtype(F32, 39, tol) == DT  # k = 18: sqrt(39) eps32 eats > 0.9 tol
    assert auto_basis_dtype(F32, 200, 1e-4) == F32  # a loose tol leaves room
    assert auto_basis_dtype(torch.bfloat16, 23, 8 * torch.finfo(torch.bfloat16).eps) == F32
    A = sym_matrix(_clustered_top_ten(), seed=3).to(F32)
    assert hesse.eigs(A, k=1, ncv=60, max_matvecs=80).basis_dtype == DT


def test_float64_norms_of_a_float32_block_cross_row_chunks():
    V = torch.randn(2 * chunk_rows(3) + 7, 3, generator=torch.Generator().manual_seed(0)).to(F32)
    op = Counted(torch.eye(2, dtype=F32))
    ref = V.double().norm(dim=0)
    assert torch.allclose(op.norm(V, dim=0).double(), ref, rtol=2 * EPS32)
    assert abs(float(op.norm(V)) - float(V.double().norm())) <= 2 * EPS32 * float(ref.norm())


def test_plan_takes_the_basis_eigs_will_take():
    obj = objective("mlp_ce")  # float64
    f64 = plan(obj, k=3)
    assert f64.basis_dtype == DT
    f32 = plan(obj, k=3, basis_dtype=F32)
    assert 2 * f32.basis_bytes == f64.basis_bytes
    assert f32.to_dict()["basis_dtype"] == "float32"
    model, data, kw = CASES["mlp_ce"].build()
    obj32 = hesse.Objective(model, data, **kw, dtype=F32)
    assert plan(obj32, k=3).basis_dtype == DT  # a small float32 model: float64, as eigs


def test_plan_lowers_the_basis_to_float32_before_anything_else():
    obj = objective("mlp_ce")
    free = plan(obj, k=3, probes=2, group=1, block_size=4)
    cap = free.total_bytes - free.basis_bytes // 4  # float64 misses, float32 fits
    p = plan(obj, k=3, probes=2, group=1, block_size=4, max_memory=cap)
    assert p.fits and p.basis_dtype == F32 and p.keep_graphs and p.block_size == 4
    q = plan(obj, k=3, probes=2, group=1, block_size=4, max_memory=cap, basis_dtype=DT)
    assert q.basis_dtype == DT and (q.block_size < 4 or not q.keep_graphs)  # what else goes
