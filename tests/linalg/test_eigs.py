"""eigs and power_iteration against torch.linalg.eigh on dense float64 matrices."""

import math

import pytest
import torch

import hesse
from cases import DT, dense, objective, sym_matrix

D = 300


def random_spectrum(seed=0, d=D):
    return torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=DT)


def select(evals, k, which):
    """The k eigenvalues eigs must return, in its documented order."""
    desc = evals.sort(descending=True).values
    if which == "largest":
        return desc[:k]
    if which == "smallest":
        return desc.flip(0)[:k]
    if which == "magnitude":
        return evals[evals.abs().argsort(descending=True)][:k]
    top, bottom = desc[: math.ceil(k / 2)], desc.flip(0)[: k // 2]
    return torch.cat([top, bottom]).sort(descending=True).values


def check_eig_result(A, r, k, which, evals):
    norm = evals.abs().max().item()
    assert r.values.shape == (k,) and r.values.dtype == torch.float64
    assert r.vectors.shape == (A.shape[0], k)
    assert r.residuals.shape == (k,)
    assert r.converged is True
    assert r.which == which
    assert r.n_matvecs > 0
    want = select(evals, k, which)
    err = (r.values - want).abs().max().item()
    assert err <= 1e-8 * norm, f"values off by {err:.2e}"
    V = r.vectors.to(DT)
    # Orthonormal vectors: no ghost copies of any eigenpair.
    assert (V.T @ V - torch.eye(k, dtype=DT)).abs().max().item() <= 1e-8
    true_res = (A @ V - V * r.values).norm(dim=0)
    assert true_res.max().item() <= 1e-7 * norm
    assert r.residuals.max().item() <= 1e-7 * norm


@pytest.mark.parametrize("as_operator", [False, True])
@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude", "both"])
@pytest.mark.parametrize("k", [1, 6, 50])
def test_eigs_random_spectrum(k, which, as_operator):
    evals = random_spectrum()
    A = sym_matrix(evals)
    r = hesse.eigs(hesse.DenseOperator(A) if as_operator else A, k=k, which=which)
    check_eig_result(A, r, k, which, evals)


@pytest.mark.parametrize("which", ["largest", "magnitude"])
def test_eigs_degenerate_spectrum_finds_every_copy(which):
    # Eigenvalue 5 with multiplicity 3 inside the top 6 (7 > 5 = 5 = 5 > 4.5 > 4.2).
    evals = torch.cat(
        [
            torch.tensor([7.0, 5.0, 5.0, 5.0, 4.5, 4.2], dtype=DT),
            torch.linspace(-4.0, 4.0, D - 6, dtype=DT),
        ]
    )
    A = sym_matrix(evals, seed=1)
    r = hesse.eigs(A, k=6, which=which)
    check_eig_result(A, r, 6, which, evals)
    assert (r.values[1:4] - 5.0).abs().max() <= 1e-8


def test_eigs_clustered_spectrum():
    # Top 10 eigenvalues 10, 9.99, 9.98, ... : relative gaps 1e-3.
    top = 10.0 * (1 - 1e-3 * torch.arange(10, dtype=DT))
    evals = torch.cat(
        [top, torch.rand(D - 10, generator=torch.Generator().manual_seed(2), dtype=DT) * 10 - 5]
    )
    A = sym_matrix(evals, seed=2)
    r = hesse.eigs(A, k=10, which="largest")
    check_eig_result(A, r, 10, "largest", evals)


def test_eigs_tiny_budget_reports_not_converged():
    A = sym_matrix(random_spectrum(3), seed=3)
    r = hesse.eigs(A, k=5, max_matvecs=12)
    assert r.converged is False
    assert r.values.shape == (5,)
    assert r.n_matvecs <= 12
    assert torch.isfinite(r.values).all()


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_eigs_on_model_hessian_matches_dense_reference(which):
    H = dense("hessian", "block_ce")
    evals = torch.linalg.eigvalsh(H)
    op = hesse.HessianOperator(objective("block_ce"))
    r = hesse.eigs(op, k=4, which=which)
    check_eig_result(H, r, 4, which, evals)
    assert op.n_matvecs == r.n_matvecs


def test_power_iteration_top_eigenvalue_within_tol():
    # PSD spectrum with a clear gap (10 vs 6): power iteration finds the top eigenvalue; the
    # Rayleigh-quotient error when the relative change drops below tol is ~ tol / (1 - 0.36).
    evals = torch.cat([torch.tensor([10.0, 6.0], dtype=DT), torch.linspace(0, 5, 98, dtype=DT)])
    A = sym_matrix(evals, seed=4)
    for tol in (1e-3, 1e-6):
        r = hesse.power_iteration(A, k=1, tol=tol)
        assert r.values.shape == (1,)
        assert abs(r.values[0].item() - 10.0) <= 10 * tol * 10.0
        q1 = torch.linalg.eigh(A).eigenvectors[:, -1]
        assert abs(q1 @ r.vectors[:, 0].to(DT)) >= 1 - 10 * tol


def test_budget_and_basis_are_validated():
    A = torch.diag(torch.arange(1.0, 31.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_matvecs"):
        hesse.eigs(A, k=5, max_matvecs=2)
    with pytest.raises(ValueError, match="ncv"):
        hesse.eigs(A, k=6, ncv=4)
    with pytest.raises(ValueError, match="max_matvecs"):
        hesse.power_iteration(A, k=3, max_matvecs=4)


def test_top_one_spends_no_verification_round():
    A = torch.diag(torch.arange(1.0, 51.0, dtype=torch.float64))
    r = hesse.eigs(A, k=1)
    assert r.converged and r.n_matvecs <= 50
    assert abs(float(r.values[0]) - 50.0) <= 1e-9


def test_power_iteration_residual_belongs_to_the_returned_vector():
    A = torch.diag(torch.tensor([10.0, 5.0, 1.0, 0.5], dtype=torch.float64))
    r = hesse.power_iteration(A, k=1, tol=1e-12, max_matvecs=200)
    x, theta = r.vectors[:, 0], float(r.values[0])
    assert abs(float(torch.linalg.vector_norm(A @ x - theta * x)) - float(r.residuals[0])) < 1e-12
