"""The Lanczos core (hesse.linalg._lanczos): float64 basis, its relation, breakdowns, bounds."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from cases import DT, sym_matrix
from hesse.linalg._lanczos import Lanczos, orthogonalize, step
from hesse.linalg._util import Counted, generator


def outlier_bulk(d=200, seed=1):
    """Outliers {1, 0.5, 0.2} and a bulk of d - 3 values in [0, 2e-4]: a trained network's."""
    bulk = torch.rand(d - 3, generator=torch.Generator().manual_seed(seed), dtype=DT) * 2e-4
    return torch.cat([torch.tensor([1.0, 0.5, 0.2], dtype=DT), bulk])


def run(A, steps, b=1, seed=0):
    op = Counted(A)
    gen = generator(seed)
    start = torch.randn(A.shape[0], b, generator=torch.Generator().manual_seed(seed), dtype=DT)
    lz = Lanczos(op, steps + b, start, gen)
    while lz.n < steps and lz.b:
        step([lz], op)
    return op, lz


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b", [1, 2])
def test_relation_holds_in_float64_whatever_the_product_dtype(dtype, b):
    # A V = V H + F C up to the round-off of the products, with V orthonormal to float64
    # round-off even when the products are float32 (the old basis was float32).
    A = sym_matrix(outlier_bulk(), seed=2)
    op, lz = run(A.to(dtype), 40, b)
    V, F = lz.V[:, : lz.n], lz.frontier
    assert V.dtype == torch.float64 and lz.H.dtype == torch.float64
    eye = torch.eye(lz.n + lz.b, dtype=DT)
    W = torch.cat([V, F], 1)
    assert (W.T @ W - eye).abs().max() <= 1e-13
    assert torch.equal(lz.H, lz.H.T)
    gap = A.to(dtype).double() @ V - V @ lz.H - F @ lz.C
    assert gap.norm() <= 20 * torch.finfo(dtype).eps * A.norm()
    assert op.n == lz.n


class CountMatmuls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += getattr(func, "__name__", "") in ("__matmul__", "matmul", "addmv", "addmv_")
        return func(*args, **(kwargs or {}))


def test_orthogonalize_reorthogonalizes_only_when_the_norm_drops():
    # DGKS: one pass (2 products with Q) while w keeps more than 1/sqrt(2) of its norm, a
    # second one when it does not; either way the remainder is orthogonal to round-off.
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(50, 5, generator=gen, dtype=DT))[0]
    far = torch.randn(50, generator=gen, dtype=DT)
    near = Q @ torch.ones(5, dtype=DT) + 1e-9 * far
    passes, unsharded = [], Counted(torch.eye(50, dtype=DT))
    for w in (far, near):
        with CountMatmuls() as count:
            h, g, r, norm = orthogonalize(w, Q, torch.zeros(50, 0, dtype=DT), unsharded)
        passes.append(count.n // 2)
        assert norm == pytest.approx(float(r.norm()), rel=1e-15)
        assert (Q.T @ r).abs().max() <= 1e-14 * norm
        assert (Q @ h + r - w).abs().max() <= 1e-15
        assert g.numel() == 0
    assert passes == [1, 2]


def test_breakdown_only_at_an_invariant_subspace_and_bounds_keep_beta():
    # The bulk's couplings (~1e-4 of ||A||) are far above float32 round-off: no breakdown.
    # The old test (beta <= 1e3 eps lambda_max = 1.2e-4) declared one and zeroed the bounds.
    A = sym_matrix(outlier_bulk(), seed=3).float()
    op, lz = run(A, 30)
    assert lz.b == 1 and lz.D.numel() == 0
    theta, S, bounds = lz.ritz()
    assert (bounds > 0).all()
    # A matrix with 4 distinct eigenvalues: the Krylov space is invariant after 4 products.
    D = torch.diag(torch.tensor([3.0, 2.0, 1.0, -1.0], dtype=DT).repeat_interleave(5))
    op, lz = run(D, 10)
    assert lz.n == 4 and lz.b == 0 and op.n == 4
    theta, S, bounds = lz.ritz()
    assert torch.allclose(theta, torch.tensor([-1.0, 1.0, 2.0, 3.0], dtype=DT), atol=1e-13)
    assert bounds.max() <= 1e-13


def slightly_non_symmetric(scale=1e-9, seed=5):
    """``outlier_bulk`` (||A|| = 1) plus ``scale`` times a non-symmetric matrix of unit norm."""
    N = torch.randn(200, 200, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return sym_matrix(outlier_bulk(), seed=seed) + scale * N / torch.linalg.matrix_norm(N, 2)


@pytest.mark.parametrize("b", [1, 2])
def test_relation_keeps_what_a_symmetric_projection_drops(b):
    # H stays symmetric; K holds the measured asymmetry, so the relation holds exactly for a
    # non-symmetric operator too (before, it was dropped: a gap of the asymmetry's size).
    A = slightly_non_symmetric()
    op, lz = run(A, 40, b)
    V, F = lz.V[:, : lz.n], lz.frontier
    assert torch.equal(lz.H, lz.H.T) and lz.K.abs().max() >= 1e-12
    assert (A @ V - V @ lz.H - F @ lz.C - V @ lz.K).norm() <= 1e-14


@pytest.mark.parametrize("case", ["float32", "non-symmetric"])
def test_bounds_are_not_below_the_true_residuals_after_restarts(case):
    # A restart keeps the part of K along the kept vectors and moves the rest into D.
    symmetric = sym_matrix(outlier_bulk(), seed=4).float()
    A = symmetric if case == "float32" else slightly_non_symmetric()
    op = Counted(A)
    start = torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    lz = Lanczos(op, 12, start, generator(0))
    for _ in range(25):
        if lz.n + lz.b > 12:
            theta, S, _ = lz.ritz()
            lz.restart(theta, S, torch.argsort(theta, descending=True)[:6])
        step([lz], op)
    theta, S, bounds = lz.ritz()
    X = lz.vectors(S)
    true = (A.double() @ X - X * theta).norm(dim=0)
    assert (X.norm(dim=0) - 1).abs().max() <= 1e-14
    assert (true <= bounds + 2 * torch.finfo(A.dtype).eps).all()
    assert bounds[-3:].max() <= 1e-6  # the outliers converged: their bounds are not vacuous


def test_a_non_symmetric_operator_is_refused_with_the_size_of_its_asymmetry():
    A = slightly_non_symmetric(1e-3)
    with pytest.raises(ValueError, match=r"differ by \d\.\de-0[45] relative to \|\|A\|\|"):
        run(A, 5)


def test_step_multiplies_every_frontier_in_one_product():
    A = sym_matrix(torch.linspace(-1, 1, 30, dtype=DT))
    sizes = []

    class Recording:
        shape, dtype, device = A.shape, A.dtype, A.device

        def __matmul__(self, V):
            sizes.append(V.shape[1])
            return A @ V

    op = Counted(Recording())
    gen = generator(0)
    runs = [Lanczos(op, 5, torch.randn(30, b, generator=gen, dtype=DT), gen) for b in (1, 2, 1)]
    step(runs, op)
    assert sizes == [4] and op.n == 4
    assert [lz.n for lz in runs] == [1, 2, 1]
