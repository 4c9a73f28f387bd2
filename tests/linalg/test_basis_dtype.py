"""A float32 Lanczos basis (float64 sums): the adversarial float32 spectra, bounds still honest."""

import pytest
import torch

import hesse
from cases import DT, sym_matrix

F32 = torch.float32


def _outlier_bulk(d=200, seed=1):
    bulk = torch.rand(d - 3, generator=torch.Generator().manual_seed(seed), dtype=DT) * 2e-4
    return torch.cat([torch.tensor([1.0, 0.5, 0.2], dtype=DT), bulk])


def _honest(A, r, k, which, tol, slack=4):
    """Values within tol ||A||, bounds not below the true residuals (up to slack round-offs)."""
    exact = A.double()
    evals = torch.linalg.eigvalsh(exact)
    norm, eps = evals.abs().max().item(), torch.finfo(A.dtype).eps
    order = {"largest": evals.flip(0), "smallest": evals}[which][:k]
    assert r.converged, r.reason
    assert (r.values - order).abs().max() <= tol * norm
    X = r.vectors.double()
    true = (exact @ X - X * r.values).norm(dim=0)
    assert (true <= r.residuals + slack * eps * norm).all(), (true, r.residuals)


@pytest.mark.parametrize(("which", "k"), [("largest", 3), ("largest", 8), ("smallest", 3)])
def test_float32_basis_resolves_outliers_and_bulk_with_honest_bounds(which, k):
    A = sym_matrix(_outlier_bulk(), seed=0).to(F32)
    for seed in range(2):
        r = hesse.eigs(A, k=k, which=which, seed=seed, basis_dtype=F32)
        assert r.vectors.dtype == F32
        _honest(A, r, k, which, 16 * torch.finfo(F32).eps)
        ref = hesse.eigs(A, k=k, which=which, seed=seed, basis_dtype=DT)
        assert (r.values - ref.values).abs().max() <= 16 * torch.finfo(F32).eps


def test_float32_basis_clustered_top_ten():
    top = 10.0 * (1 - 1e-3 * torch.arange(10, dtype=DT))
    rest = torch.rand(290, generator=torch.Generator().manual_seed(2), dtype=DT) * 10 - 5
    A = sym_matrix(torch.cat([top, rest]), seed=2).float()
    r = hesse.eigs(A, k=10, basis_dtype=F32)
    _honest(A, r, 10, "largest", 16 * torch.finfo(F32).eps)


def test_float32_basis_bounds_include_its_storage_round_off():
    # the same products: a float32 basis can only widen the bounds (by eps32 sqrt(n) ||A||)
    A = sym_matrix(_outlier_bulk(), seed=0).to(F32)
    wide = hesse.eigs(A, k=2, basis_dtype=F32, tol=1e-3)
    narrow = hesse.eigs(A, k=2, tol=1e-3, basis_dtype=DT)
    assert wide.residuals.min() >= torch.finfo(F32).eps * 1.0
    assert narrow.residuals.min() < wide.residuals.min()


def test_basis_dtype_must_be_floating():
    with pytest.raises(ValueError, match="basis_dtype must be a floating dtype"):
        hesse.eigs(torch.eye(3, dtype=DT), k=1, basis_dtype=torch.int32)
