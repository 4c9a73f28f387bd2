"""Finite-difference products (HessianOperator(mode="fd")): their error reaches every bound.

A result computed from approximate products must never be more trusted than the products:
solve's residuals and ``converged``, power iteration's residuals and the SLQ trace interval
all carry ``product_error``; checked against the exact dense Hessian.
"""

import torch

import hesse
from cases import CASES, DT, dense

F32 = torch.float32


def _fd_float32():
    """The float32 finite-difference Hessian of mlp_ce, and the exact float64 one."""
    model, data, kw = CASES["mlp_ce"].build()
    obj = hesse.Objective(model, data, **kw, dtype=F32)
    return hesse.HessianOperator(obj, mode="fd"), dense("hessian", "mlp_ce")


def test_solve_residuals_bound_the_true_ones_and_carry_the_product_error():
    op, H = _fd_float32()
    d = H.shape[0]
    lam = float(-torch.linalg.eigvalsh(H)[0]) + 1.0  # H + lam I positive definite
    B = torch.randn(d, 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    r = hesse.solve(op, B.float(), damping=lam, method="minres", tol=1e-3)
    assert r.product_error == op.product_error > 0
    X = r.value.double()
    true = (B - (H + lam * torch.eye(d, dtype=DT)) @ X).norm(dim=0)
    assert (true <= r.residual_norm).all(), (true, r.residual_norm)
    assert (r.residual_norm >= r.product_error * X.norm(dim=0)).all()
    assert r.converged
    # a tolerance below what the products can certify is not reported as met
    tight = hesse.solve(op, B.float(), damping=lam, method="cg", tol=1e-7)
    assert not tight.converged
    assert (tight.residual_norm >= tight.product_error * tight.value.double().norm(dim=0)).all()


def test_exact_products_report_no_product_error():
    H = dense("hessian", "mlp_ce")
    lam = float(-torch.linalg.eigvalsh(H)[0]) + 1.0
    b = torch.ones(H.shape[0], dtype=DT)
    r = hesse.solve(H, b, damping=lam, method="minres")
    assert r.product_error == 0.0 and r.converged


def test_power_iteration_residuals_carry_the_product_error():
    op, H = _fd_float32()
    r = hesse.power_iteration(op, k=1, max_matvecs=60, seed=0)
    x = r.vectors[:, 0].double()
    x = x / x.norm()
    true = (H @ x - r.values[0] * x).norm()
    assert r.residuals[0] >= op.product_error
    assert true <= r.residuals[0] + 1e-5 * H.norm()  # the residual of the returned vector


def test_density_trace_interval_widened_by_the_product_error():
    op, H = _fd_float32()
    s = hesse.density(op, steps=8, probes=4, seed=0)
    assert s.product_error == op.product_error > 0
    t = s.trace_estimate
    half = (t.ci95[1] - t.ci95[0]) / 2
    assert half >= H.shape[0] * s.product_error
    assert hesse.density(H, steps=8, probes=4, seed=0).product_error == 0.0


def test_frobenius_interval_carries_the_product_error():
    op, H = _fd_float32()
    r = hesse.frobenius_norm(op, method="exact")
    lo, hi = r.squared.ci95
    e, d = op.product_error, H.shape[0]
    true = float((H**2).sum())
    assert lo <= true <= hi
    assert (hi - lo) / 2 >= 2 * e * (d * abs(r.squared.value)) ** 0.5


def test_diagonal_bias_bound_covers_the_products_error():
    op, H = _fd_float32()
    fd = hesse.diagonal(op, budget=20, seed=0)
    exact = hesse.diagonal(H, budget=20, seed=0)  # the same probes, exact products
    assert fd.product_error == op.product_error > 0 and exact.bias_bound == 0.0
    assert fd.bias_bound == op.product_error * H.shape[0] ** 0.5
    gap = (fd.value.double() - exact.value).abs().max().item()
    assert 0 < gap <= fd.bias_bound
