"""DenseOperator, IdentityOperator, and operator arithmetic (sums, scaling, damping)."""

import pytest
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


def _thirds():
    return hesse.ParamSpace(["a", "b", "c"], [(2,), (3,), (4,)])


def test_sum_with_a_term_without_layout_refuses_to_restrict():
    A = sym_matrix(torch.linspace(1, 2, 9), seed=2)
    with_space = hesse.DenseOperator(A, space=_thirds())
    S = with_space + hesse.DenseOperator(2 * A)
    assert S.space is with_space.space
    with pytest.raises(ValueError, match=r"term 1 of the sum \(DenseOperator.*no parameter layout"):
        S.restrict("a")
    with pytest.raises(ValueError, match="term 0 of the sum"):
        (hesse.IdentityOperator(9, dtype=DT) + with_space).blocks()


def test_sum_of_operators_with_different_layouts_is_refused():
    A = sym_matrix(torch.linspace(1, 2, 9), seed=2)
    other = hesse.ParamSpace(["a", "c"], [(2,), (7,)])
    with pytest.raises(ValueError, match=r"operators 0 and 1 have different parameter layouts"):
        hesse.DenseOperator(A, space=_thirds()) + hesse.DenseOperator(A, space=other)
    with pytest.raises(ValueError, match=r"operators 0 and 1 have different parameter layouts"):
        hesse.DenseOperator(A, space=_thirds()) @ hesse.DenseOperator(A, space=other)
    # The same layout in another ParamSpace object is the same layout.
    S = hesse.DenseOperator(A, space=_thirds()) + hesse.DenseOperator(2 * A, space=_thirds())
    assert torch.allclose(S.restrict("b").to_dense(), 3 * A[2:5, 2:5], rtol=1e-12)


def test_sum_of_a_list_of_operators():
    obj = objective("mlp_ce")
    H, G = hesse.HessianOperator(obj), hesse.GGNOperator(obj)
    h, g = dense("hessian", "mlp_ce"), dense("ggn", "mlp_ce")
    V = torch.randn(obj.dim, 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    S = sum([H, G, 0.5 * H])
    assert ((S @ V) - (1.5 * h + g) @ V).norm() <= 1e-10 * (h.norm() + g.norm()) * V.norm()
    assert 0 + H is H and H + 0 is H and sum([H]) is H
    with pytest.raises(TypeError):
        1 + H


def test_sum_declares_the_promoted_dtype():
    A = sym_matrix(torch.linspace(1, 2, 9), seed=2)
    single, double = hesse.DenseOperator(A.float()), hesse.DenseOperator(A)
    v = torch.ones(9, dtype=DT)
    for S, want in ((single + double, 2 * A), (double + single, 2 * A), (single - double, 0 * A)):
        assert S.dtype == torch.float64
        out = S @ v
        assert out.dtype == torch.float64 == S.to_dense().dtype
        assert (out - want @ v).norm() <= 1e-6 * A.norm() * v.norm()
    assert (single + single).dtype == torch.float32
