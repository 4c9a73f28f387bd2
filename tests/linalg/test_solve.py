"""solve (cg, minres, lissa) against torch.linalg.solve, and the PSD refusal."""

import pytest
import torch

import hesse
from cases import DT, dense, objective, sym_matrix

D = 60


def spd():
    return sym_matrix(torch.logspace(-1, 1, D, dtype=DT), seed=20)  # condition number 100


def rhs(k=None, seed=21):
    shape = (D,) if k is None else (D, k)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def rel(a, b):
    return ((a.to(DT) - b).norm() / b.norm()).item()


@pytest.mark.parametrize("k", [None, 3])
@pytest.mark.parametrize("damping", [0.0, 0.5])
@pytest.mark.parametrize("method", ["cg", "minres", "lissa"])
def test_solve_spd(method, damping, k):
    A, b = spd(), rhs(k)
    op = hesse.DenseOperator(A, tags={"symmetric", "psd"})
    want = torch.linalg.solve(A + damping * torch.eye(D, dtype=DT), b)
    r = hesse.solve(op, b, damping=damping, method=method, tol=1e-10, max_matvecs=20000)
    assert r.converged is True
    assert r.value.shape == b.shape
    assert rel(r.value, want) <= (1e-6 if method == "lissa" else 1e-8)
    assert r.n_matvecs > 0


def test_minres_on_indefinite_symmetric_matrix():
    evals = torch.cat([-torch.linspace(0.5, 3, D // 2, dtype=DT), torch.linspace(0.5, 3, D // 2)])
    A, b = sym_matrix(evals, seed=22), rhs()
    r = hesse.solve(A, b, method="minres", tol=1e-10)
    assert r.converged is True
    assert rel(r.value, torch.linalg.solve(A, b)) <= 1e-8


@pytest.mark.parametrize("method", ["cg", "lissa"])
def test_psd_solvers_refuse_hessian_without_damping(method):
    op = hesse.HessianOperator(objective("mlp_ce"))
    with pytest.raises(ValueError, match="(?i)damping"):
        hesse.solve(op, torch.ones(op.shape[0], dtype=DT), method=method)


def test_cg_refuses_indefinite_plain_tensor_without_damping():
    evals = torch.cat([-torch.linspace(0.5, 3, D // 2, dtype=DT), torch.linspace(0.5, 3, D // 2)])
    with pytest.raises(ValueError, match="(?i)damping"):
        hesse.solve(sym_matrix(evals, seed=3), rhs(), method="cg")
    assert hesse.solve(spd(), rhs(), method="cg").converged  # a PSD tensor is recognised as such


def test_cg_on_damped_hessian():
    H = dense("hessian", "mlp_ce")
    lam = max(0.0, -torch.linalg.eigvalsh(H)[0].item()) + 0.1  # H + lam I is positive definite
    op = hesse.HessianOperator(objective("mlp_ce"))
    b = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0), dtype=DT)
    r = hesse.solve(op, b, damping=lam, method="cg", tol=1e-10, max_matvecs=5000)
    want = torch.linalg.solve(H + lam * torch.eye(op.shape[0], dtype=DT), b)
    assert r.converged is True
    assert rel(r.value, want) <= 1e-7
    assert r.n_matvecs == op.n_matvecs


def test_cg_on_ggn_without_damping_is_allowed():
    op = hesse.GGNOperator(objective("linear_mse"))  # full rank: kron(I_2, 4x4 Gram of 7 samples)
    G = dense("ggn", "linear_mse")
    b = G @ torch.ones(op.shape[0], dtype=DT)  # in the range of G
    r = hesse.solve(op, b, method="cg", tol=1e-10, max_matvecs=500)
    assert rel(G @ r.value.to(DT), b) <= 1e-7


def test_tiny_budget_reports_not_converged():
    r = hesse.solve(spd(), rhs(), damping=1e-3, method="cg", tol=1e-12, max_matvecs=3)
    assert r.converged is False
    assert r.n_matvecs <= 3


def test_converged_is_decided_by_the_true_residual():
    A, b = spd().float(), rhs().float()
    r = hesse.solve(A, b, method="cg", tol=1e-9, max_matvecs=400)  # below float32 round-off
    true = torch.linalg.vector_norm(b - A @ r.value) / torch.linalg.vector_norm(b)
    assert r.converged is False and float(true) > 1e-9
    assert abs(float(r.residual_norm[0]) - float(torch.linalg.vector_norm(b - A @ r.value))) < 1e-5


def test_negative_damping_is_refused():
    with pytest.raises(ValueError, match="damping"):
        hesse.solve(spd(), rhs(), damping=-1.0)


def test_lissa_stays_within_a_small_budget():
    r = hesse.solve(spd(), rhs(), method="lissa", max_matvecs=10)
    assert r.n_matvecs <= 10 and r.converged is False


def test_cg_stops_multiplying_converged_columns():
    A = spd()
    B = rhs(3)
    B[:, 0] = torch.linalg.eigh(A).eigenvectors[:, 5]  # CG solves an eigenvector in one step
    B[:, 1] = 0.0  # converged before the first product
    x0 = torch.zeros_like(B)
    r = hesse.solve(A, B, method="cg", tol=1e-10, x0=x0)
    assert r.converged is True and torch.equal(x0, torch.zeros_like(B))
    assert rel(r.value, torch.linalg.solve(A, B)) <= 1e-8
    singles = [hesse.solve(A, B[:, i], method="cg", tol=1e-10).n_matvecs for i in range(3)]
    assert singles[:2] == [2, 1]  # one CG product + the final residual; the final residual only
    # Columns apart cost what they cost together (up to a round-off step at the threshold);
    # multiplying every column until the slowest converged cost 3 x 73 + 3 = 222.
    assert sum(singles) <= r.n_matvecs <= sum(singles) + 2
    assert r.n_matvecs < 80


def test_cg_column_with_negative_curvature_stops_alone():
    evals = torch.cat([-torch.linspace(0.5, 3, D // 2, dtype=DT), torch.linspace(0.5, 3, D // 2)])
    A = sym_matrix(evals, seed=22)
    V = torch.linalg.eigh(A).eigenvectors
    B = torch.stack([V[:, 0], V[:, -1]], 1)  # eigenvalues -3 and 3; damping 1 leaves -2 and 4
    r = hesse.solve(A, B, damping=1.0, method="cg", tol=1e-10, max_matvecs=200)
    assert r.converged is False
    assert float(r.residual_norm[1]) <= 1e-10  # the positive-definite column still converged
    assert r.n_matvecs <= 4


@pytest.mark.parametrize("budget", [0, 1, 5])
def test_a_budget_below_two_per_column_is_refused(budget):
    # max_matvecs=0 used to mean "the default" (10 d per column).
    with pytest.raises(
        ValueError, match=r"max_matvecs must be at least 6 \(2 per column of b, which has 3\)"
    ):
        hesse.solve(spd(), rhs(3), max_matvecs=budget)


@pytest.mark.parametrize("budget", [10.0, "10", True])
def test_a_budget_that_is_not_an_integer_is_refused(budget):
    with pytest.raises(TypeError, match="max_matvecs must be an integer"):
        hesse.solve(spd(), rhs(), max_matvecs=budget)


@pytest.mark.parametrize("shape", [(D + 1,), (D, 1), (D, 2)])
def test_x0_of_another_shape_than_b_is_refused(shape):
    with pytest.raises(ValueError, match=r"x0 has shape .* b has shape \(60,\)"):
        hesse.solve(spd(), rhs(), x0=torch.zeros(shape, dtype=DT))
    r = hesse.solve(spd(), rhs(), x0=torch.zeros(D, dtype=torch.float32), tol=1e-10)
    assert r.converged and rel(r.value, torch.linalg.solve(spd(), rhs())) <= 1e-8
