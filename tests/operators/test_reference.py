"""The dense references themselves, checked against formulas written here by hand."""

import pytest
import torch
import torch.nn.functional as F

import hesse
from cases import ALL, CASES, CE_TUPLE, dense, flat_loss, objective

RTOL = 1e-10


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", ALL)
def test_dense_hessian_equals_torch_func_hessian_of_full_data_loss(name):
    # full_loss concatenates all batches (or sums tokens), so uneven batches must be weighted
    # exactly for the two to agree.
    loss, theta = flat_loss(name)
    want = torch.func.hessian(loss)(theta)
    assert rel(dense("hessian", name), want) <= RTOL


def _tuple_data(name):
    model, data, _ = CASES[name].build()
    xs, ys = zip(*[(b[0], b[1]) for b in data], strict=True)
    return model, torch.cat(xs), torch.cat(ys)


def _jacobian(name):
    """Per-sample output Jacobians (N, C, d) at theta0, in the objective's parameter order."""
    model, x, y = _tuple_data(name)
    _, theta = flat_loss(name)
    space = objective(name).space
    shapes = {n: p.shape for n, p in model.named_parameters()}
    slices = space.slices()

    def out(t):
        params = {n: t[slices[n]].reshape(shapes[n]) for n in space.names}
        return torch.func.functional_call(model, params, (x,))

    return torch.func.jacrev(out)(theta), out(theta), y


def test_dense_ggn_of_linear_mse_is_the_closed_form():
    # L = 1/(N C) sum_n ||W x_n + b - t_n||^2 with (W, b) flattened as [W row-major, b]:
    # the Hessian (= GGN, the model is linear) is 2/(N C) * kron(I_C, X~^T X~) after reordering.
    model, x, _ = _tuple_data("linear_mse")
    n, c = x.shape[0], model.out_features
    xt = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)
    gram = 2.0 / (n * c) * xt.T @ xt
    d_in = x.shape[1]
    index = {}
    for k in range(c):
        index[k] = [k * d_in + j for j in range(d_in)] + [c * d_in + k]
    want = torch.zeros(c * (d_in + 1), c * (d_in + 1), dtype=x.dtype)
    for k in range(c):
        ix = torch.tensor(index[k])
        want[ix[:, None], ix[None, :]] = gram
    names = objective("linear_mse").space.names
    assert names == ["weight", "bias"]
    assert rel(dense("ggn", "linear_mse"), want) <= RTOL
    assert rel(dense("hessian", "linear_mse"), want) <= RTOL


def test_dense_ggn_of_mlp_mse_is_jacobian_gram():
    J, out, _ = _jacobian("mlp_mse")
    n, c = out.shape
    want = 2.0 / (n * c) * torch.einsum("ncd,nce->de", J, J)
    assert rel(dense("ggn", "mlp_mse"), want) <= RTOL


@pytest.mark.parametrize("name", CE_TUPLE)
def test_dense_ggn_of_cross_entropy_is_jacobian_softmax_hessian(name):
    J, logits, _ = _jacobian(name)
    p = logits.softmax(-1)
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    want = torch.einsum("ncd,nck,nke->de", J, h, J) / logits.shape[0]
    assert rel(dense("ggn", name), want) <= RTOL


@pytest.mark.parametrize("name", CE_TUPLE)
def test_dense_empirical_fisher_is_mean_outer_product_of_per_sample_gradients(name):
    J, logits, y = _jacobian(name)
    g_logits = logits.softmax(-1) - F.one_hot(y, logits.shape[-1]).to(logits.dtype)
    g = torch.einsum("ncd,nc->nd", J, g_logits)  # per-sample gradients of per-sample CE
    want = g.T @ g / g.shape[0]
    assert rel(dense("fisher", name), want) <= RTOL


@pytest.mark.parametrize("reference", ["dense_ggn", "dense_fisher"])
def test_output_references_run_the_model_once_per_batch(reference):
    # the outputs came from a forward pass of their own, besides the Jacobian's
    model, data, kwargs = CASES["mlp_ce"].build()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    obj = hesse.Objective(model, data, **kwargs)
    dense = getattr(hesse.reference, reference)(obj)
    assert len(calls) == len(data)
    assert rel(dense, getattr(hesse.reference, reference)(objective("mlp_ce"))) <= RTOL
