import statistics

import pytest
import torch
import torch.nn.functional as F
from quant_models import batches, mlp, mlp_objective, token_batches, transformer_objective
from torch import nn

from hesse import Objective, quant, reference
from hesse.quant import Quantizer

LAYERS = {"0": "0.weight", "2": "2.weight"}


def block(H, obj, param):
    s = obj.space.slices()[param]
    return H[s, s]


def test_trace_scores_are_unbiased_block_traces_per_parameter():
    obj = mlp_objective()
    H = reference.dense_hessian(obj)
    exact = {n: float(torch.trace(block(H, obj, p))) for n, p in LAYERS.items()}
    runs = [quant.sensitivity(obj, (2, 4), budget=10, seed=s) for s in range(40)]
    for name, param in LAYERS.items():
        n = obj.params[param].numel()
        values = [r[name].trace for r in runs]
        spread = statistics.stdev(values) / len(values) ** 0.5
        assert abs(statistics.fmean(values) - exact[name]) < 4 * spread
        row = runs[0][name]
        assert (
            row.trace_per_param == pytest.approx(row.trace / n) and row.score == row.trace_per_param
        )
        assert row.per_param_stderr == pytest.approx(row.trace_stderr / n)
        assert row.trace_ci95[0] < row.trace < row.trace_ci95[1]
    covered = [r[n].trace_ci95[0] <= exact[n] <= r[n].trace_ci95[1] for r in runs for n in LAYERS]
    assert sum(covered) / len(covered) >= 0.85


def test_delta_sq_is_the_error_of_the_quantizer_quantize_applies():
    obj = mlp_objective()
    q = Quantizer(granularity="group", group_size=2, symmetric=False)
    sens = quant.sensitivity(obj, (2, 3, 8), quantizer=q, budget=4)
    for row in sens.layers:
        for b in (2, 3, 8):
            qm = quant.quantize(obj.model, {row.name: b}, q)
            W, Wq = (
                dict(obj.model.named_parameters())[row.param],
                dict(qm.named_parameters())[row.param],
            )
            assert row.delta_sq[b] == pytest.approx(
                float(((Wq - W).detach() ** 2).sum()), rel=1e-12
            )
            assert row.omega[b] == pytest.approx(max(row.score, 0) * row.delta_sq[b])


def test_eig_is_the_top_eigenvalue_of_each_block():
    obj = mlp_objective()
    H = reference.dense_hessian(obj)
    sens = quant.sensitivity(obj, (4,), method="eig", budget=200)
    for name, param in LAYERS.items():
        top = float(torch.linalg.eigvalsh(block(H, obj, param))[-1])
        assert sens[name].top_eig == pytest.approx(top, rel=1e-8) and sens[name].eig_converged


def test_qbert_is_mean_plus_std_of_batch_top_eigenvalues():
    model, data = mlp(), batches()
    sens = quant.sensitivity(
        Objective(model, data, F.cross_entropy), (4,), method="qbert", budget=200
    )
    for name, param in LAYERS.items():
        tops = []
        for batch in data:
            one = Objective(model, [batch], F.cross_entropy)
            tops.append(
                float(torch.linalg.eigvalsh(block(reference.dense_hessian(one), one, param))[-1])
            )
        row = sens[name]
        assert row.eig_mean == pytest.approx(statistics.fmean(tops), rel=1e-8)
        assert row.eig_std == pytest.approx(statistics.stdev(tops), rel=1e-6)
        assert row.score == pytest.approx(row.eig_mean + row.eig_std)


def test_negative_traces_are_reported_and_count_as_zero():
    model = nn.Sequential(nn.Linear(3, 2)).double().eval()
    x = torch.randn(16, 3, dtype=torch.float64)
    obj = Objective(model, (x, torch.zeros(16)), loss=lambda out, y: -(out**2).mean())
    sens = quant.sensitivity(obj, (2, 4), budget=20)
    row = sens["0"]
    assert row.trace < 0 and row.negative and row.omega == {2: 0.0, 4: 0.0}
    assert "yes" in sens.table() and "negative" in sens.rule


def test_transformer_rows_macs_and_json():
    obj = transformer_objective()
    sens = quant.sensitivity(obj, (2, 8), budget=6)
    assert sens.names == ["blocks.0.attn.qkv_weight", "blocks.0.attn.out_weight",
                          "blocks.0.mlp.in_weight", "blocks.0.mlp.out_weight", "head"]  # fmt: skip
    T = token_batches()[0][0].shape[1]
    assert all(r.macs == r.n_params * T for r in sens.layers)  # each weight once per position
    doc = sens.to_json()
    assert doc["layers"][0]["omega"].keys() == {"2", "8"} and doc["quantizer"]["bits"] == 4


def test_conv_macs_count_output_positions():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(32, 3)).double()
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    sens = quant.sensitivity(Objective(model.eval(), (x, torch.tensor([0, 1, 2, 0])),
                                       F.cross_entropy), (4,), budget=4)  # fmt: skip
    assert sens["0"].macs == 18 * 16 and sens["2"].macs == 96


def test_bad_input_is_refused():
    obj = mlp_objective()
    with pytest.raises(ValueError, match="method must be"):
        quant.sensitivity(obj, method="hessian")
    with pytest.raises(ValueError, match="1 to 16"):
        quant.sensitivity(obj, (0, 4))
    with pytest.raises(ValueError, match="unknown layer '3'"):
        quant.sensitivity(obj, layers=["3"])
    with pytest.raises(ValueError, match=r"does not analyse the weights of \['0'\]"):
        quant.sensitivity(mlp_objective(params=["2"]), layers=["0"])
