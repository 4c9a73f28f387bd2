"""HessianOperator(mode="fd"): Richardson-extrapolated central differences with honest errors."""

import pytest
import torch

import hesse
from cases import CASES as CASES_BY_NAME
from cases import DT, dense, objective

CASES = ["mlp_ce", "mlp_mse", "block_ce", "dict_hf"]


@pytest.mark.parametrize("name", CASES)
def test_fd_products_are_within_their_reported_error(name):
    H = dense("hessian", name)
    op = hesse.HessianOperator(objective(name), mode="fd")
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    err = ((op @ V - H @ V).norm(dim=0) / V.norm(dim=0)).max().item()
    assert 0 < op.product_error <= 1e-7 * max(1.0, H.norm().item())
    assert err <= op.product_error


def test_fd_float32_error_covers_the_true_error_and_is_folded_into_eigs_and_trace():
    H = dense("hessian", "mlp_ce")
    exact = torch.linalg.eigvalsh(H).flip(0)
    model, data, kw = CASES_BY_NAME["mlp_ce"].build()
    obj = hesse.Objective(model, data, **kw, dtype=torch.float32)
    op = hesse.HessianOperator(obj, mode="fd")
    V = torch.randn(H.shape[0], 4, generator=torch.Generator().manual_seed(1), dtype=DT)
    err = ((op @ V.float() - (H @ V).float()).double().norm(dim=0) / V.norm(dim=0)).max()
    assert err.item() <= op.product_error < 1e-2 * H.norm().item()
    r = hesse.eigs(op, k=2, tol=1e-3, seed=0)
    assert r.converged
    assert (r.residuals >= op.product_error).all()  # never more trusted than the products
    assert ((r.values - exact[:2]).abs() <= r.residuals).all()
    t = hesse.trace(op, budget=H.shape[0], method="exact")
    lo, hi = t.ci95
    assert lo <= torch.trace(H).item() <= hi
    assert hi - lo >= 2 * op.product_error


def test_fd_mode_needs_no_double_backward():
    # a once-differentiable Function: exact products refuse it, finite differences do not
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g

    class Model(torch.nn.Module):
        def __init__(self, once):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=DT))
            self.once = once

        def forward(self, x):
            z = self.w * x
            return (Square.apply(z) if self.once else z * z).sum(1, keepdim=True)

    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(2), dtype=DT)
    data, mse = (x, torch.ones(6, 1, dtype=DT)), torch.nn.functional.mse_loss
    once, plain = (hesse.Objective(Model(o), data, loss=mse) for o in (True, False))
    with pytest.raises(RuntimeError, match="cannot differentiate twice"):
        hesse.HessianOperator(once) @ torch.ones(3, dtype=DT)
    fd = hesse.HessianOperator(once, mode="fd")
    H = hesse.HessianOperator(plain).to_dense()
    assert (fd.to_dense() - H).abs().max() <= fd.product_error * 3**0.5


def test_fd_refuses_unknown_modes():
    with pytest.raises(ValueError, match="'fd'"):
        hesse.HessianOperator(objective("mlp_ce"), mode="finite")
