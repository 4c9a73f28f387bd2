"""DenseOperator, IdentityOperator, and operator arithmetic (sums, scaling, damping)."""

import torch

import hesse
from cases import DT, dense, objective, sym_matrix


def test_dense_operator_matches_its_matrix(assert_operator_matches):
    A = sym_matrix(torch.linspace(-2, 3, 40))
    op = hesse.DenseOperator(A)
    assert op.space is None
    assert_operator_matches(op, A)


def test_dense_operator_with_space_has_blocks(assert_operator_matches):
    space = objective("mlp_ce").space
    A = sym_matrix(torch.linspace(0.1, 3, space.dim), seed=1)
    op = hesse.DenseOperator(A, tags={"symmetric", "psd"}, space=space)
    assert op.tags == frozenset({"symmetric", "psd"})
    assert_operator_matches(op, A)


def test_identity_operator():
    op = hesse.IdentityOperator(7, dtype=DT, device=torch.device("cpu"))
    assert op.shape == (7, 7)
    assert op.dtype == DT
    assert torch.equal(op.to_dense(), torch.eye(7, dtype=DT))
    assert "psd" in op.tags


def test_sum_difference_scaling_damping_match_dense_arithmetic(assert_operator_matches):
    obj = objective("mlp_ce")
    H, G = hesse.HessianOperator(obj), hesse.GGNOperator(obj)
    h, g = dense("hessian", "mlp_ce"), dense("ggn", "mlp_ce")
    eye = torch.eye(obj.dim, dtype=DT)
    cases = {
        "H + G": (H + G, h + g),
        "H - G": (H - G, h - g),
        "2 * H": (2.0 * H, 2.0 * h),
        "H.damped(0.3)": (H.damped(0.3), h + 0.3 * eye),
        "G.damped(0.3) + 0.5 * H": (G.damped(0.3) + 0.5 * H, g + 0.3 * eye + 0.5 * h),
    }
    V = torch.randn(obj.dim, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    for what, (op, want) in cases.items():
        assert op.shape == (obj.dim, obj.dim), what
        err = ((op @ V) - want @ V).norm() / (want.norm() * V.norm())
        assert err.item() <= 1e-10, what
        err = ((op @ V[:, 0]) - want @ V[:, 0]).norm() / (want.norm() * V[:, 0].norm())
        assert err.item() <= 1e-10, what
    assert_operator_matches(H.damped(0.3), h + 0.3 * eye, count=False)


def test_arithmetic_tags():
    obj = objective("mlp_ce")
    H, G = hesse.HessianOperator(obj), hesse.GGNOperator(obj)
    assert "psd" not in (H + G).tags
    assert "symmetric" in (H + G).tags
    assert "psd" in (G + G).tags
    assert "psd" in G.damped(0.1).tags
    assert "psd" not in H.damped(0.1).tags
