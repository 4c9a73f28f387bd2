"""Operator algebra: products, transposes, scalars and inverses, against dense float64 matrices."""

import numpy as np
import pytest
import torch

import hesse
from cases import DT, dense, objective, sym_matrix
from hesse.linalg import InverseOperator, NotConvergedError
from hesse.operators import DenseOperator, Operator, ProductOperator

D = 30
EYE = torch.eye(D, dtype=DT)


def indefinite():
    return sym_matrix(torch.linspace(-2, 3, D, dtype=DT), seed=1)


def spd():
    return sym_matrix(torch.logspace(-1, 1, D, dtype=DT), seed=2)  # condition number 100


def nonsymmetric():
    return torch.randn(D, D, generator=torch.Generator().manual_seed(3), dtype=DT)


def vectors(k=4, seed=0):
    return torch.randn(D, k, generator=torch.Generator().manual_seed(seed), dtype=DT)


def close(got, want, rtol=1e-10):
    return ((got.to(DT) - want).norm() / want.norm()).item() <= rtol


class Shift(Operator):
    """A non-symmetric operator without a known transpose (a cyclic shift)."""

    def __init__(self):
        super().__init__(D, DT, "cpu")

    def _matmat(self, V):
        return V.roll(1, 0)


# ---------------------------------------------------------------------------------- products


def test_product_of_two_operators_matches_the_dense_product(assert_operator_matches):
    A, B = indefinite(), spd()
    P = DenseOperator(A) @ DenseOperator(B)
    assert isinstance(P, ProductOperator)
    assert P.tags == frozenset()  # A B is not symmetric although A and B are
    assert_operator_matches(P, A @ B)


def test_product_of_three_factors_and_their_counts():
    A, B, N = indefinite(), spd(), nonsymmetric()
    a, b, n = DenseOperator(A), DenseOperator(B), DenseOperator(N)
    P = a @ b @ n
    assert close(P @ vectors(), A @ B @ N @ vectors())
    assert (P.n_matvecs, a.n_matvecs, b.n_matvecs, n.n_matvecs) == (4, 4, 4, 4)


def test_square_of_a_symmetric_operator_is_symmetric_psd():
    a = DenseOperator(indefinite())
    assert (a @ a).tags == frozenset({"symmetric", "psd"})
    assert (a @ DenseOperator(indefinite())).tags == frozenset()  # not provably the same


def test_model_operator_products():
    obj = objective("mlp_ce")
    H, G = hesse.HessianOperator(obj), hesse.GGNOperator(obj)
    h, g = dense("hessian", "mlp_ce"), dense("ggn", "mlp_ce")
    V = torch.randn(obj.dim, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    assert close((H @ G) @ V, h @ g @ V)
    assert close((H @ G) @ V[:, 0], h @ g @ V[:, 0])
    with pytest.raises(NotImplementedError, match="restrict the factors first"):
        (H @ G).restrict(obj.space.names[:1])


def test_products_compose_with_eigs_and_trace():
    obj = objective("mlp_ce")
    H, G = hesse.HessianOperator(obj), hesse.GGNOperator(obj)
    h, g = dense("hessian", "mlp_ce"), dense("ggn", "mlp_ce")
    r = hesse.eigs(G @ G, k=3, tol=1e-10)
    want = torch.linalg.eigvalsh(g @ g).flip(0)[:3]
    assert torch.allclose(r.values.to(DT), want, rtol=1e-7, atol=1e-10 * want[0].item())
    t = hesse.trace(H @ G, method="exact")
    assert t.value == pytest.approx(torch.trace(h @ g).item(), rel=1e-10)
    t = hesse.trace(H @ G, budget=60, seed=0)
    assert t.n_matvecs == 60 and abs(t.value - torch.trace(h @ g).item()) <= 5 * t.stderr
    with pytest.raises(ValueError, match="symmetric"):
        hesse.eigs(H @ G, k=1)


# -------------------------------------------------------------------------------- transposes


def test_transpose_of_symmetric_operators_is_the_operator():
    obj = objective("mlp_ce")
    H = hesse.HessianOperator(obj)
    assert H.T is H
    a = DenseOperator(spd())
    s = 2 * a + a
    assert a.T is a and s.T is s


def test_transpose_of_products_sums_and_scalings():
    A, B, N = indefinite(), spd(), nonsymmetric()
    a, b, n = DenseOperator(A), DenseOperator(B), DenseOperator(N)
    V = vectors()
    cases = {
        "(a b)^T": ((a @ b).T, (A @ B).T),
        "(a b n)^T": ((a @ b @ n).T, (A @ B @ N).T),
        "n^T": (n.T, N.T),
        "(2 n + a)^T": ((2.0 * n + a).T, (2 * N + A).T),
        "(a b)^T^T": ((a @ b).T.T, A @ B),
    }
    for what, (op, want) in cases.items():
        assert close(op @ V, want @ V), what
    assert isinstance((a @ b).T, ProductOperator) and (a @ b).T.ops == [b, a]


def test_transpose_without_a_known_transpose_says_so():
    with pytest.raises(ValueError, match=r"Shift\.T: the operator is not declared symmetric"):
        _ = Shift().T
    with pytest.raises(ValueError, match="not declared symmetric"):
        _ = (Shift() @ DenseOperator(spd())).T


# ----------------------------------------------------------------------------------- scalars


SCALARS = [
    2,
    -1.5,
    np.float32(2.5),
    np.float64(-0.5),
    np.int64(3),
    np.array(0.25),
    torch.tensor(0.5),
    torch.tensor(-2.0, dtype=torch.float32),
    torch.tensor(3),
]


@pytest.mark.parametrize("c", SCALARS, ids=[f"{type(c).__name__}({float(c)})" for c in SCALARS])
def test_scalar_multiplication_and_division(c):
    B = spd()
    b = DenseOperator(B)
    V = vectors()
    for op, want in ((c * b, float(c) * B), (b * c, float(c) * B), (b / c, B / float(c))):
        assert close(op @ V, want @ V)
        assert ("psd" in op.tags) == (float(c) > 0)
        assert "symmetric" in op.tags


@pytest.mark.parametrize(
    "c", [torch.tensor([2.0]), np.array([1.0, 2.0]), 1j, torch.tensor(1j), "2", None]
)
def test_non_scalars_are_refused(c):
    b = DenseOperator(spd())
    with pytest.raises(TypeError):
        b * c
    with pytest.raises(TypeError):
        b / c


def test_division_by_zero_and_non_finite_scalars():
    b = DenseOperator(spd())
    with pytest.raises(ZeroDivisionError):
        b / torch.tensor(0.0)
    with pytest.raises(ValueError, match="finite"):
        b * float("nan")


# ---------------------------------------------------------------------------------- inverses


def test_inverse_of_a_psd_operator(assert_operator_matches):
    B = spd()
    inv = hesse.inverse(DenseOperator(B), tol=1e-12)
    assert isinstance(inv, InverseOperator)
    assert inv.tags == frozenset({"symmetric", "psd"}) and inv.T is inv
    assert_operator_matches(inv, torch.linalg.inv(B), rtol=1e-9)
    inv @ vectors(3)
    assert inv.last.converged is True and inv.last.value.shape == (D, 3)


@pytest.mark.parametrize("method", ["cg", "minres", "lissa"])
def test_damped_inverse_of_an_indefinite_operator(method):
    A = indefinite()  # eigenvalues in [-2, 3]; A + 2.5 I has them in [0.5, 5.5]
    a = DenseOperator(A)
    inv = hesse.inverse(a, 2.5, method=method, tol=1e-11, max_matvecs=20_000)
    assert inv.tags == frozenset({"symmetric"})
    V = vectors()
    assert close(inv @ V, torch.linalg.solve(A + 2.5 * EYE, V), 1e-8)
    assert a.n_matvecs == inv.last.n_matvecs > 0


def test_minres_inverse_without_damping():
    A = indefinite() + 0.05 * EYE  # no eigenvalue at 0
    inv = hesse.inverse(DenseOperator(A), method="minres", tol=1e-12)
    assert close(inv @ vectors(), torch.linalg.solve(A, vectors()), 1e-9)


def test_inverse_is_refused_where_solve_would_be():
    with pytest.raises(ValueError, match="damping"):
        hesse.inverse(DenseOperator(indefinite()))
    with pytest.raises(ValueError, match="damping"):
        hesse.inverse(hesse.HessianOperator(objective("mlp_ce")), method="cg")
    with pytest.raises(ValueError, match="symmetric"):
        hesse.inverse(DenseOperator(nonsymmetric()), 1.0)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        hesse.inverse(DenseOperator(spd()), -1.0)
    with pytest.raises(ValueError, match="method"):
        hesse.inverse(DenseOperator(spd()), method="lu")


def test_unconverged_inverse_raises_unless_allowed():
    b = DenseOperator(spd())
    inv = hesse.inverse(b, tol=1e-12, max_matvecs=10)
    with pytest.raises(NotConvergedError, match="max_matvecs.*damping.*allow_unconverged") as err:
        inv @ vectors(1)[:, 0]
    assert err.value.result is inv.last and inv.last.converged is False
    lax = hesse.inverse(b, tol=1e-12, max_matvecs=10, allow_unconverged=True)
    x = lax @ vectors(1)[:, 0]
    assert x.shape == (D,) and lax.last.converged is False and lax.last.n_matvecs <= 10


def test_inverse_of_a_damped_model_hessian():
    obj = objective("mlp_ce")
    h = dense("hessian", "mlp_ce")
    lam = max(0.0, -torch.linalg.eigvalsh(h)[0].item()) + 0.1
    H = hesse.HessianOperator(obj)
    inv = hesse.inverse(H, lam, tol=1e-12, max_matvecs=5000)
    V = torch.randn(obj.dim, 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    want = torch.linalg.solve(h + lam * torch.eye(obj.dim, dtype=DT), V)
    assert close(inv @ V, want, 1e-9)
    assert H.n_matvecs == inv.last.n_matvecs and inv.n_matvecs == 2
    with pytest.raises(NotImplementedError, match="restrict first, then invert"):
        inv.restrict(obj.space.names[:1])


def test_inverses_compose_with_products_scalars_eigs_and_trace():
    A, B = indefinite(), spd()
    a, b = DenseOperator(A), DenseOperator(B)
    inv = hesse.inverse(b, 0.5, tol=1e-12)
    Binv = torch.linalg.inv(B + 0.5 * EYE)
    V = vectors()
    assert close((inv @ a) @ V, Binv @ A @ V, 1e-9)
    assert close((inv @ a).T @ V, A @ Binv @ V, 1e-9)
    assert close((2 * inv) @ V, 2 * Binv @ V, 1e-9)
    assert close((inv @ b) @ V, V - 0.5 * Binv @ V, 1e-9)
    r = hesse.eigs(inv, k=2, tol=1e-9)
    want = torch.linalg.eigvalsh(Binv).flip(0)[:2]
    assert torch.allclose(r.values.to(DT), want, rtol=1e-7)
    assert hesse.trace(inv, method="exact").value == pytest.approx(torch.trace(Binv).item(), 1e-9)


def test_inverse_budget_is_per_column():
    M = torch.diag(torch.arange(1.0, 6.0, dtype=DT))  # CG: 5 steps + 1 residual per column
    inv = hesse.inverse(DenseOperator(M), max_matvecs=8)
    V = torch.ones(5, 5, dtype=DT)
    assert close(inv @ V, torch.linalg.solve(M, V), 1e-8)
    assert inv.last.converged and inv.last.n_matvecs <= 5 * 8
    assert close(inv @ V[:, 0], torch.linalg.solve(M, V[:, 0]), 1e-8)
    assert inv.last.n_matvecs <= 8


@pytest.mark.parametrize("budget", [0, 1])
def test_inverse_with_a_budget_below_two_is_refused_when_built(budget):
    with pytest.raises(ValueError, match="inverse: max_matvecs must be at least 2 per column"):
        hesse.inverse(DenseOperator(spd()), max_matvecs=budget)


def test_inverse_takes_the_layout_of_an_operator_only():
    space = objective("mlp_ce").space
    B = sym_matrix(torch.logspace(-1, 1, space.dim, dtype=DT), seed=2)
    assert hesse.inverse(DenseOperator(B, space=space)).space is space
    assert InverseOperator(B, 0.0).space is None  # a dense tensor has no layout

    class Duck:  # shape, dtype, device and @: an operator to solve, whatever else it holds
        shape, dtype, device, tags, space = B.shape, DT, B.device, {"symmetric", "psd"}, "x"

        def __matmul__(self, V):
            return B @ V

    assert InverseOperator(Duck(), 0.0).space is None


def test_gram_products_of_a_non_symmetric_operator_are_symmetric_psd(assert_operator_matches):
    N = nonsymmetric()
    n = DenseOperator(N)
    t = n.T
    for op, want in ((n @ n.T, N @ N.T), (n.T @ n, N.T @ N), (t @ t.T, N.T @ N)):
        assert op.tags == frozenset({"symmetric", "psd"})
        assert_operator_matches(op, want, count=False)
    assert (n @ DenseOperator(N.T)).tags == frozenset()  # not provably a transpose
    assert (n @ n).tags == frozenset()
    r = hesse.eigs(n @ n.T, k=2, tol=1e-10)
    assert torch.allclose(r.values.to(DT), torch.linalg.eigvalsh(N @ N.T).flip(0)[:2], rtol=1e-8)


def test_an_operator_without_an_exact_inverse_names_hesse_inverse():
    with pytest.raises(NotImplementedError, match=r"hesse.inverse\(op, damping=...\)"):
        DenseOperator(spd()).inverse(1.0)
