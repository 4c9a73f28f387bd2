"""``sensitivity(method="kfac")``: each layer's KFAC block trace per weight, from the factors.

Against dense references (float64): the scores are the traces of the diagonal blocks of
``KFACOperator(obj).to_dense()``; on a deep linear network with squared loss, where KFAC's
blocks are the GGN's and the Hessian's, they are the exact Hessian block traces, and
``method="trace"``'s Hutchinson estimates agree within their error bars.
"""

import pytest
import torch
import torch.nn.functional as F
from quant_models import mlp_objective
from torch import nn

from hesse import KFACOperator, Objective, reference
from hesse.quant import SENSITIVITY_METHODS, sensitivity


def block_traces(obj: Objective, dense: torch.Tensor) -> dict[str, float]:
    """Traces of the diagonal blocks of a dense ``(d, d)`` matrix, by parameter name."""
    out, start = {}, 0
    for name, shape in zip(obj.space.names, obj.space.shapes, strict=True):
        size = shape.numel()
        out[name] = float(dense.diagonal()[start : start + size].sum())
        start += size
    return out


def deep_linear():
    """Three Linear layers (3-5-4-2), no activation, squared loss, three uneven batches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 4), nn.Linear(4, 2)).double().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(23, 3, generator=g, dtype=torch.float64)
    t = torch.randn(23, 2, generator=g, dtype=torch.float64)
    data = [(x[:10], t[:10]), (x[10:20], t[10:20]), (x[20:], t[20:])]
    return Objective(model, data, loss=F.mse_loss)


def test_the_cli_offers_kfac():
    assert "kfac" in SENSITIVITY_METHODS


@pytest.mark.parametrize(("curvature", "kind"), [(None, "exact"), ("fisher", "empirical")])
def test_scores_are_the_kfac_block_traces_per_weight(curvature, kind):
    obj = mlp_objective()
    s = sensitivity(obj, bits=(2, 4), method="kfac", curvature=curvature)
    weights = obj.restrict(["0.weight", "2.weight"])
    traces = block_traces(weights, KFACOperator(weights, kind=kind).to_dense())
    assert s.method == "kfac" and s.curvature == (curvature or "ggn") and s.n_matvecs == 0
    for row in s.layers:
        assert row.trace == pytest.approx(traces[row.param], rel=1e-10)
        assert row.score == pytest.approx(traces[row.param] / row.n_params, rel=1e-10)
        assert row.trace_stderr == 0.0 and row.trace_ci95 == (row.trace, row.trace)
        assert row.omega == {b: row.score * d for b, d in row.delta_sq.items()}


def test_on_a_deep_linear_network_kfac_is_the_exact_hessian_trace():
    """Measured: the Hutchinson estimates (100 probes) are off by -1.50, -0.50, +0.17 stderr."""
    obj = deep_linear()
    kfac = sensitivity(obj, bits=(4,), method="kfac")
    hutchinson = sensitivity(obj, bits=(4,), method="trace", budget=100, seed=0)
    exact = block_traces(obj, reference.dense_hessian(obj))  # diagonal blocks: the GGN's
    for row, est in zip(kfac.layers, hutchinson.layers, strict=True):
        assert row.trace == pytest.approx(exact[row.param], rel=1e-10)
        assert abs(est.trace - row.trace) <= 3 * est.trace_stderr + 1e-12
        assert row.omega[4] == pytest.approx(est.omega[4] * row.score / est.score, rel=1e-12)


def test_kfac_has_no_hessian():
    with pytest.raises(ValueError, match="curvature='ggn'.*method='trace'"):
        sensitivity(mlp_objective(), method="kfac", curvature="hessian")
