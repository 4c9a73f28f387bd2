import pytest
import torch
import torch.nn.functional as F
from quant_models import batches, mlp, mlp_objective, transformer_objective

from hesse import Objective, quant
from hesse.quant import Quantizer
from hesse.quant.reconstruct import _targets


def block_error(obj, model, reference):
    """Squared error of every module output of ``model`` against ``reference`` on the data."""
    with torch.no_grad():
        return sum(float(((model(x) - reference(x)) ** 2).sum()) for x, _ in obj.batches())


@pytest.mark.parametrize("weighting", ["mse", "aphq"])
def test_weights_stay_on_the_original_grid_and_the_model_untouched(weighting):
    obj = transformer_objective()
    before = {n: p.clone() for n, p in obj.model.state_dict().items()}
    bits = {n: 3 for n in quant.quantizable(obj.model) if n != "head"}  # head: 7 rows
    q = Quantizer(3, "group", group_size=8)
    out = quant.reconstruct(obj, bits, quantizer=q, weighting=weighting, steps=20, lr=0.05)
    assert all(torch.equal(before[n], p) for n, p in obj.model.state_dict().items())
    weights = dict(out.named_parameters())
    for param in bits:
        W = before[param]
        grid = q.codes(W, 3)
        assert torch.equal(grid.project(weights[param].detach()), weights[param].detach())
        assert (weights[param] - W).abs().max() <= 2 * grid.scale.max() + 1e-12


def test_mse_reconstruction_fits_outputs_better_than_rounding():
    obj = mlp_objective()
    bits = {"0": 2, "2": 2}
    rtn = quant.quantize(obj.model, bits, Quantizer(2))
    fitted = quant.reconstruct(
        obj, bits, quantizer=Quantizer(2), weighting="mse", steps=300, lr=0.05
    )
    assert block_error(obj, fitted, obj.model) < 0.8 * block_error(obj, rtn, obj.model)


def test_aphq_weights_are_absolute_hessian_row_sums_of_the_block_output():
    model, (batch,) = mlp(), batches(1)
    obj = Objective(model, [batch], F.cross_entropy)
    x, y = batch
    hidden = torch.tanh(model[0](x)).detach()

    def loss(z):
        return F.cross_entropy(model[2](torch.tanh(z)), y) * len(y)

    z = model[0](x).detach()
    H = torch.autograd.functional.hessian(loss, z).reshape(z.numel(), z.numel())
    rows = H.sum(1).abs().reshape(z.shape)
    _, (h,) = _targets(obj, obj.frozen | obj.params, model[0], [batch], "aphq", 1e-4)
    assert torch.allclose(h, rows / rows.mean(), rtol=1e-5, atol=1e-8)
    assert hidden.shape == h.shape


def test_bad_input_is_refused():
    obj = mlp_objective()
    with pytest.raises(ValueError, match="weighting must be"):
        quant.reconstruct(obj, {"0": 4}, weighting="hessian")
    with pytest.raises(ValueError, match="no module 'x'"):
        quant.reconstruct(obj, {"0": 4}, blocks=["x"])
    with pytest.raises(ValueError, match=r"layers \['2'\] are in no block"):
        quant.reconstruct(obj, {"0": 4, "2": 4}, blocks=["0"])
    with pytest.raises(ValueError, match="unknown layer"):
        quant.reconstruct(obj, {"fc": 4})
    with pytest.raises(ValueError, match="does not analyse '0.weight'"):
        quant.reconstruct(mlp_objective(params=["2"]), {"0": 4})
