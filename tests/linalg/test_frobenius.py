"""frobenius_norm (exact, Hutchinson, Hutch++): exactness, bias, CI coverage, budgets."""

import pytest
import torch

import hesse
from cases import DT, dense, objective, sym_matrix
from hesse.linalg.frobenius import FrobeniusResult, frobenius_norm
from hesse.linalg.trace import TraceResult

SEEDS = range(400)  # binomial sd of a 95% coverage over 400 seeds: 1.1%


def outlier():
    """One eigenvalue 30 and 29 in [0, 1]: ||Az||^2 is about 900 chi^2_1, heavy-tailed."""
    return sym_matrix(torch.cat([torch.tensor([30.0], dtype=DT), torch.linspace(0, 1, 29)]), seed=7)


def decaying():
    return sym_matrix(50.0 * 0.85 ** torch.arange(60, dtype=DT), seed=10)


def nonsymmetric():
    return torch.randn(40, 40, generator=torch.Generator().manual_seed(3), dtype=DT)


MATRICES = {"outlier": outlier, "decaying": decaying, "nonsymmetric": nonsymmetric}


@pytest.mark.parametrize("matrix", list(MATRICES))
def test_exact_frobenius_norm(matrix):
    A = MATRICES[matrix]()
    for inp in (A, hesse.DenseOperator(A, tags=())):
        r = frobenius_norm(inp, method="exact", block_size=7)
        assert isinstance(r, FrobeniusResult) and isinstance(r.squared, TraceResult)
        assert r.value == pytest.approx(torch.linalg.matrix_norm(A).item(), rel=1e-12)
        assert r.squared.value == pytest.approx((A**2).sum().item(), rel=1e-12)
        assert r.stderr == 0 and r.ci95 == (r.value, r.value)
        assert r.n_matvecs == A.shape[0] and r.squared.method == "exact"


def test_frobenius_norm_of_a_model_hessian():
    op = hesse.HessianOperator(objective("mlp_ce"))
    H = dense("hessian", "mlp_ce")
    r = frobenius_norm(op, budget=60, seed=0)
    exact = torch.linalg.matrix_norm(H).item()
    assert r.n_matvecs == op.n_matvecs <= 60
    assert r.ci95[0] - 1e-10 <= exact <= r.ci95[1] + 1e-10
    assert frobenius_norm(op, method="exact").value == pytest.approx(exact, rel=1e-10)


@pytest.fixture(scope="module")
def runs():
    """Estimates over 400 seeds for each matrix, method and budget (bias and coverage)."""
    out = {}
    for name, make in MATRICES.items():
        A = make()
        for method, budget in (("hutchinson", 20), ("hutchinson", 60), ("hutch++", 60)):
            results = [frobenius_norm(A, budget, method=method, seed=s) for s in SEEDS]
            out[name, method, budget] = ((A**2).sum().item(), results)
    return out


KEYS = [(m, meth, b) for m in MATRICES for meth, b in (("hutchinson", 20), ("hutchinson", 60))]
KEYS += [(m, "hutch++", 60) for m in MATRICES]


@pytest.mark.parametrize("key", KEYS, ids=["-".join(map(str, k)) for k in KEYS])
def test_squared_norm_is_unbiased(runs, key):
    exact, results = runs[key]
    values = torch.tensor([r.squared.value for r in results], dtype=DT)
    se = values.std().item() / len(values) ** 0.5
    assert abs(values.mean().item() - exact) <= 4 * se
    assert all(r.n_matvecs <= key[2] and r.squared.method == key[1] for r in results)
    r = results[0]  # the norm is the square root of the squared estimate, its interval too
    assert r.value == pytest.approx(r.squared.value**0.5, rel=1e-14)
    assert r.ci95 == pytest.approx(tuple(max(c, 0.0) ** 0.5 for c in r.squared.ci95), rel=1e-14)
    assert r.stderr == pytest.approx(r.squared.stderr / (2 * r.value), rel=1e-14)


@pytest.mark.parametrize("key", KEYS, ids=["-".join(map(str, k)) for k in KEYS])
def test_ci95_covers_the_norm_95_percent_of_the_time(runs, key):
    # A plain t-interval of the skewed ||Az||^2 covers 89-90% on the outlier at 20 samples.
    exact, results = runs[key]
    hits = sum(r.ci95[0] <= exact**0.5 <= r.ci95[1] for r in results)
    assert 0.92 <= hits / len(results) <= 0.98, hits


def test_hutchpp_beats_hutchinson_on_decaying_spectrum():
    A = decaying()
    exact = (A**2).sum().item()
    err = {}
    for method in ("hutchinson", "hutch++"):
        vals = torch.tensor(
            [frobenius_norm(A, 60, method=method, seed=s).squared.value for s in range(100)]
        )
        err[method] = ((vals - exact) ** 2).mean().sqrt().item()
    assert err["hutch++"] < 0.2 * err["hutchinson"], err


def test_sketch_spanning_the_space_is_exact():
    A = outlier()  # budget >= 3 d: the sketch spans R^30
    r = frobenius_norm(A, 100, seed=0)
    exact = torch.linalg.matrix_norm(A).item()
    assert r.squared.samples == 0 and r.n_matvecs == 60
    assert r.ci95[0] <= exact <= r.ci95[1] and r.ci95[1] - r.ci95[0] <= 1e-12 * exact


def test_float32_operator():
    A = outlier()
    r = frobenius_norm(A.float(), method="exact")
    assert r.value == pytest.approx(torch.linalg.matrix_norm(A).item(), rel=1e-6)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="method"):
        frobenius_norm(outlier(), method="slq")
    with pytest.raises(ValueError, match="at least 4"):
        frobenius_norm(outlier(), 3, method="hutch++")
