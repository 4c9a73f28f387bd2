"""Every algorithm takes numpy arrays, scipy operators and duck-typed operators."""

import numpy as np
import pytest
import torch
from scipy import sparse
from scipy.sparse.linalg import LinearOperator, aslinearoperator

import hesse
from cases import DT, sym_matrix
from hesse.linalg._util import as_operator

D = 60


def matrix():
    evals = torch.linspace(0.5, 6.0, D, dtype=DT)  # positive definite
    return sym_matrix(evals, seed=11)


class CountingLinearOperator(LinearOperator):
    """A scipy operator that records the shape of every block it is applied to."""

    def __init__(self, M):
        super().__init__(np.float64, M.shape)
        self.M, self.blocks = M, []

    def _matmat(self, X):
        self.blocks.append(X.shape[1])
        return self.M @ X

    def _matvec(self, x):
        return self._matmat(x.reshape(-1, 1)).reshape(-1)


def test_numpy_array_is_a_float64_operator():
    A = matrix()
    top = torch.linalg.eigvalsh(A).flip(0)[:3]
    for M in (A.numpy(), A.float().numpy()):
        r = hesse.eigs(M, k=3)
        assert r.values.dtype == torch.float64 and r.vectors.dtype == torch.float64
        assert (r.values - top).abs().max() <= 1e-6 * float(top[0])
    s = hesse.density(A.numpy(), steps=10, probes=2)
    assert s.nodes.shape == (2, 10)
    assert hesse.trace(A.numpy(), method="exact").value == pytest.approx(float(A.trace()))
    assert hesse.diagonal(A.numpy(), budget=4).value.shape == (D,)
    b = torch.ones(D, dtype=DT)
    x = hesse.solve(A.numpy(), b).value
    assert torch.allclose(A @ x, b, atol=1e-6)


def test_scipy_linear_operator_products_go_through_matmat():
    A = matrix()
    lin = CountingLinearOperator(A.numpy())
    r = hesse.eigs(lin, k=4)
    ref = hesse.eigs(A, k=4)
    assert torch.allclose(r.values, ref.values, atol=1e-9, rtol=0)
    assert sum(lin.blocks) == r.n_matvecs
    assert set(lin.blocks) <= {1, 2}  # a block of two start vectors for k > 1
    lin.blocks.clear()
    s = hesse.density(lin, steps=8, probes=3)
    assert lin.blocks == [3] * 8 and s.n_matvecs == 24
    t = hesse.trace(aslinearoperator(A.numpy()), method="exact")
    assert t.value == pytest.approx(float(A.trace()))


def test_scipy_sparse_matrix_and_to_scipy_round_trip():
    A = matrix()
    top = torch.linalg.eigvalsh(A).flip(0)[:2]
    S = sparse.csr_matrix(A.numpy())
    assert torch.allclose(hesse.eigs(S, k=2).values, top, atol=1e-9, rtol=0)
    lin = hesse.DenseOperator(A).to_scipy()
    assert torch.allclose(hesse.eigs(lin, k=2).values, top, atol=1e-9, rtol=0)


def test_non_symmetric_inputs_are_refused_where_known():
    M = np.array([[1.0, 5.0], [0.0, 2.0]])
    for bad in (M, sparse.csr_matrix(M)):
        with pytest.raises(ValueError, match="not symmetric|does not declare"):
            hesse.eigs(bad, k=1)
        with pytest.raises(ValueError, match="not symmetric|does not declare"):
            hesse.density(bad, steps=2, probes=1)


class Duck:
    def __init__(self, A, tags=None):
        self.A, self.shape, self.dtype, self.device = A, A.shape, A.dtype, A.device
        if tags is not None:
            self.tags = frozenset(tags)

    def __matmul__(self, V):
        return self.A @ V


def test_duck_typed_operators_with_and_without_tags():
    A = matrix()
    top = torch.linalg.eigvalsh(A)[-1]
    assert abs(hesse.eigs(Duck(A), k=1).values[0] - top) <= 1e-9  # no tags: trusted
    assert abs(hesse.eigs(Duck(A, ["symmetric"]), k=1).values[0] - top) <= 1e-9
    with pytest.raises(ValueError, match="does not declare the tag 'symmetric'"):
        hesse.eigs(Duck(A, ["psd"]), k=1)
    with pytest.raises(ValueError, match="does not declare the tag 'symmetric'"):
        hesse.density(Duck(A, []), steps=3, probes=1)


def nonsymmetric(scale, seed=12):
    """``matrix()`` plus ``scale * ||A||`` times a fixed non-symmetric matrix of unit norm."""
    N = torch.randn(D, D, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return matrix() + scale * 6.0 * N / torch.linalg.matrix_norm(N, 2)


def test_non_symmetric_operators_that_declare_nothing_are_refused_by_the_run():
    # A LinearOperator or an object without tags declares no structure. Today [[1, 5], [0, 2]]
    # gave 2.93 with converged=True, bound 1.2e-15 and true residual 4.96, and density nodes
    # [-2.41, 5.41]; an asymmetry of 1e-3 of ||A|| gave bounds of 5e-10 for residuals of 2e-3.
    M = np.array([[1.0, 5.0], [0.0, 2.0]])
    far, far32 = nonsymmetric(1e-3), nonsymmetric(1e-2).float()
    for bad in (aslinearoperator(M), aslinearoperator(far.numpy()), Duck(far), Duck(far32)):
        for k in (1, 3) if bad.shape[0] > 2 else (1,):
            with pytest.raises(ValueError, match=r"eigs: the operator is not symmetric: <A q_j, "):
                hesse.eigs(bad, k=k)
        with pytest.raises(ValueError, match=r"density: .* need a symmetric operator"):
            hesse.density(bad, steps=2, probes=1)


@pytest.mark.parametrize(
    ("dtype", "scale", "tol"), [(DT, 3e-11, None), (torch.float32, 2e-5, 1e-4)]
)
def test_slightly_non_symmetric_operators_are_accepted_with_honest_bounds(dtype, scale, tol):
    # An asymmetry well above the products' round-off, well below sqrt(eps): accepted, and the
    # bounds hold it (today they held only one unit of round-off: true residuals of 6e-11 in
    # float64 and 1e-4 in float32 against bounds of 1e-15 and 7e-7). It couples the top
    # eigenvector to the second, where it moves the top Ritz pair the most.
    S = matrix()
    Q = torch.linalg.eigh(S).eigenvectors
    A = (S + scale * 6.0 * torch.outer(Q[:, -2], Q[:, -1])).to(dtype)
    exact, eps = A.double(), torch.finfo(dtype).eps
    # A LinearOperator's products are float64, in which 2e-5 is far above round-off.
    for op in (aslinearoperator(A.numpy()), Duck(A)) if dtype == DT else (Duck(A),):
        for k in (1, 3):
            r = hesse.eigs(op, k=k, tol=tol)
            X = r.vectors.double()
            true = (exact @ X - X * r.values).norm(dim=0)
            assert r.converged
            assert (true <= r.residuals + 4 * eps * 6.0).all(), (true, r.residuals)
            assert true.max() >= 0.1 * scale * 6.0  # the asymmetry moved the top pair


def test_what_is_not_an_operator_is_refused():
    with pytest.raises(TypeError, match="without shape, dtype, device"):
        as_operator([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(TypeError, match="floating-point matrix"):
        hesse.eigs(torch.eye(3, dtype=torch.int64), k=1)
