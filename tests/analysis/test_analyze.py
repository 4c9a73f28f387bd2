import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hesse
from hesse.analysis import Report, analyze
from hesse.report import validate


def problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(40, 4, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (40,), generator=gen)
    return model, [(x[:25], y[:25]), (x[25:], y[25:])]


@pytest.fixture(scope="module")
def small():
    model, data = problem()
    report = analyze(model, data, F.cross_entropy, lr=0.5, k=4, budget=40, steps=20, probes=3)
    H = hesse.reference.dense_hessian(hesse.Objective(model, data, loss=F.cross_entropy))
    return report, torch.linalg.eigvalsh(H), H, model


def test_eigenvalues_match_the_dense_hessian(small):
    report, exact, _, _ = small
    assert isinstance(report, Report)
    largest, smallest = report.eigs["largest"], report.eigs["smallest"]
    assert largest["values"] == pytest.approx(exact.flip(0)[:4].tolist(), abs=1e-6)
    assert smallest["values"] == pytest.approx(exact[:5].tolist(), abs=1e-6)
    assert max(largest["residuals"]) < 1e-6


def test_trace_and_layer_traces_are_consistent_with_the_dense_hessian(small):
    report, _, H, _ = small
    lo, hi = report.trace["ci95"]
    assert lo - 1e-9 <= H.trace().item() <= hi + 1e-9
    rows = report.layers
    assert [r.name for r in rows] == ["0", "2"] and [r.kind for r in rows] == ["linear"] * 2
    assert sum(r.n_params for r in rows) == H.shape[0] == report.problem["n_params"]
    first = H[:30, :30]
    assert rows[0].top_eigenvalue == pytest.approx(torch.linalg.eigvalsh(first)[-1].item(), 1e-3)
    assert rows[0].trace_per_param == pytest.approx(rows[0].trace / 30)


def test_report_has_every_section_and_a_valid_document(small):
    report, _, _, _ = small
    doc = report.to_dict()
    assert validate(doc) == []
    assert {"eigs", "trace", "density", "ggn", "layers", "outliers", "stability"} <= doc.keys()
    assert doc["ggn"]["available"] and doc["problem"]["n_classes"] == 3
    assert doc["problem"]["n_samples"] == 40
    assert [v["criterion"] for v in doc["stability"]["verdicts"]] == ["GD", "SGD"]
    density = doc["density"]
    spacing = density["grid"][1] - density["grid"][0]
    assert sum(density["values"]) * spacing == pytest.approx(1.0, abs=0.05)
    text = report.summary()
    assert "λ_i (largest)" in text and "stability at η = 0.5" in text


def test_sections_can_be_chosen_and_others_are_absent():
    model, data = problem()
    report = analyze(model, data, F.cross_entropy, sections=["trace"], budget=8)
    doc = report.to_dict()
    assert "trace" in doc and "eigs" not in doc and "stability" not in doc
    assert validate(doc) == []


def test_loss_fn_objectives_report_why_there_is_no_ggn():
    model, data = problem()

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1]), len(batch[1])

    report = analyze(model, data, loss_fn=loss_fn, sections=["ggn"], k=2, budget=8)
    assert report.ggn["available"] is False and "loss=" in report.ggn["reason"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"k": 500, "budget": 1000}, "only 51 parameters"),
        ({"k": 10, "budget": 12}, "budget=12 products is too small"),
        ({"curvature": "hutchinson"}, "curvature='hutchinson'"),
        ({"sections": ["eigs", "landscape"]}, "unknown sections"),
        ({"lr": -1.0}, "positive learning rate"),
    ],
)
def test_bad_options_say_what_to_change(options, message):
    model, data = problem()
    with pytest.raises(ValueError, match=message):
        analyze(model, data, F.cross_entropy, **options)
