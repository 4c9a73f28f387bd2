import pytest
import torch
from quant_models import mlp
from torch import nn

from hesse import quant
from hesse.quant import Quantizer


def weight(rows=6, cols=5, seed=0):
    return torch.randn(
        rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_levels_per_row_and_round_to_nearest(bits, symmetric):
    W = weight()
    q = Quantizer(bits, "channel", symmetric=symmetric)
    Q = q.fake(W)
    for w, row in zip(W, Q, strict=True):
        levels = row.unique()
        assert len(levels) <= 2**bits
        if bits > 1 or not symmetric:  # nearest level of the row's grid (binary: sign * mean)
            c = q.codes(w[None])
            grid = c.scale * (torch.arange(c.lo, c.hi + 1, dtype=torch.float64) - c.zero)
            nearest = grid[0][(w[:, None] - grid[0]).abs().argmin(1)]
            assert torch.allclose(row, nearest, atol=1e-12)
    if symmetric and bits > 1:  # the largest magnitude is exact
        assert torch.allclose(Q.abs().amax(1), W.abs().amax(1))


def test_granularity_tensor_group_channel():
    W = weight(6, 4)
    t, g, c = (Quantizer(2, k, group_size=2).codes(W) for k in ("tensor", "group", "channel"))
    assert t.scale.shape == (1, 1) and g.scale.shape == (12, 1) and c.scale.shape == (6, 1)
    top = W.abs().reshape(12, 2).amax(1, keepdim=True)  # 2 consecutive inputs of one row
    assert torch.allclose(g.scale, top)  # L = 1 at 2 bits
    for codes in (t, g, c):
        assert torch.allclose(codes.project(W), codes.dequantize())  # same W: same grid values


def test_error_is_the_squared_distance_of_fake():
    W = weight(6, 4)
    q = Quantizer(3, "group", group_size=2, symmetric=False)
    assert q.error(W) == pytest.approx(float(((q.fake(W) - W) ** 2).sum()), rel=1e-14)


def test_asymmetric_keeps_zero_exact_and_binary_is_sign_times_mean():
    W = weight().abs() + 0.5  # all positive: the range is widened to hold 0
    W[0, 0] = 0.0
    assert Quantizer(3, symmetric=False).fake(W)[0, 0] == 0
    B = Quantizer(1).fake(W[:1] - 1.0)
    assert torch.allclose(B[0].abs(), (W[0] - 1.0).abs().mean().expand(W.shape[1]))


@pytest.mark.parametrize("bad", [0, 17, 2.5, True, -1])
def test_bits_outside_1_to_16_are_refused(bad):
    with pytest.raises(ValueError, match="1 to 16"):
        Quantizer(bad)
    with pytest.raises(ValueError, match="1 to 16"):
        quant.quantize(mlp(), {"0": bad})


def test_group_size_that_does_not_divide_is_refused():
    with pytest.raises(ValueError, match=r"group_size=4 does not divide the 5 inputs .* of w "):
        Quantizer(4, "group", group_size=4).fake(weight(), name="w")
    with pytest.raises(ValueError, match="granularity"):
        Quantizer(4, "columns")
    with pytest.raises(ValueError, match="only matrices"):
        Quantizer(4).fake(torch.ones(3))


def test_quantize_copies_and_leaves_the_model_untouched():
    model = mlp()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    q = quant.quantize(model, {"0": 2}, Quantizer(2, "tensor"))
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert torch.equal(q[0].weight, Quantizer(2, "tensor").fake(model[0].weight.detach()))
    assert torch.equal(q[0].bias, model[0].bias) and torch.equal(q[2].weight, model[2].weight)
    with pytest.raises(ValueError, match=r"unknown layer '0.weight'.*close matches: '0'"):
        quant.quantize(model, {"0.weight": 4})


def test_quantizable_names_modules_and_direct_weights():
    from quant_models import tiny_transformer

    names = quant.quantizable(tiny_transformer())
    assert names["head"] == "head.weight"
    assert "blocks.0.attn.qkv_weight" in names and "blocks.0.mlp.out_weight" in names
    assert not any(n.startswith(("embed", "position")) for n in names)  # embeddings stay float
    assert quant.quantizable(tiny_transformer(), ["blocks.0.mlp.*"]) == {
        "blocks.0.mlp.in_weight": "blocks.0.mlp.in_weight",
        "blocks.0.mlp.out_weight": "blocks.0.mlp.out_weight",
    }
    with pytest.raises(ValueError, match="no quantizable weight"):
        quant.quantizable(nn.LayerNorm(3))
