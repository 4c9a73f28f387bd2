import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hesse
from hesse.analysis import Report, analyze, prepare
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
    report = analyze(model, data, F.cross_entropy, lr=0.5, k=4, budget=100, steps=20, probes=3)
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


def test_spectral_criteria_follow_from_the_eigenvalues_and_the_density(small):
    report, exact, _, _ = small
    c = report.criteria
    assert c["k"] == 4 and c["ratio"] == pytest.approx((exact[-1] / exact[-4]).item(), rel=1e-6)
    negative = exact[exact < 0].abs().sum() / exact.abs().sum()
    assert 0 <= c["negative_share"] <= 1 and c["negative_share"] == pytest.approx(
        negative.item(), abs=0.1
    )
    assert set(c["definitions"]) == {"ratio", "negative_share", "trace_ratio"}
    assert "criteria: λmax/λ4" in report.summary()


def test_report_has_every_section_and_a_valid_document(small):
    report, _, _, _ = small
    doc = report.to_dict()
    assert validate(doc) == []
    sections = {"eigs", "trace", "density", "ggn", "layers", "outliers", "stability", "criteria"}
    assert sections <= doc.keys()
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


class WithEmptyParameters(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        self.unused = nn.Linear(4, 0)  # zero-size weight (0, 4) and bias (0,)
        self.scale = nn.Parameter(torch.empty(0))

    def forward(self, x):
        return self.body(x) + self.unused(x).sum() + self.scale.sum()


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_zero_size_parameters_get_no_layer_row_and_a_note():
    torch.manual_seed(0)
    model = WithEmptyParameters().double()
    _, data = problem()
    report = analyze(model, data, F.cross_entropy, lr=0.5, k=3, budget=12, steps=6, probes=2)
    assert [row.name for row in report.layers] == ["body.0", "body.2"]
    assert any("unused" in note and "(root)" in note for note in report.notes)
    H = hesse.reference.dense_hessian(hesse.Objective(model, data, loss=F.cross_entropy))
    assert report.layers[0].top_eigenvalue == pytest.approx(
        torch.linalg.eigvalsh(H[:30, :30])[-1].item(), rel=1e-3
    )
    assert validate(report.to_dict()) == []


def test_params_restrict_the_report_to_the_chosen_parameters():
    model, data = problem()
    chosen = ["2.weight", "2.bias"]
    report = analyze(model, data, F.cross_entropy, params=chosen, k=3, budget=40, steps=8,
                     probes=2)  # fmt: skip
    H = hesse.reference.dense_hessian(hesse.Objective(model, data, loss=F.cross_entropy))
    block = torch.linalg.eigvalsh(H[30:, 30:])
    assert report.eigs["largest"]["values"] == pytest.approx(block.flip(0)[:3].tolist(), abs=1e-6)
    assert report.trace["value"] == pytest.approx(H[30:, 30:].trace().item(), rel=0.5)
    assert [row.name for row in report.layers] == ["2"]
    doc = report.to_dict()
    assert validate(doc) == [] and doc["config"]["params"] == chosen
    assert (doc["problem"]["n_params"], doc["problem"]["n_params_total"]) == (21, 51)
    assert "parameters analysed: 21 of 51 (selection: 2.weight, 2.bias)" in report.summary()


def test_params_may_be_parameter_objects_named_in_the_report():
    model, data = problem()
    report = analyze(model, data, F.cross_entropy, params=[model[2].weight, model[2].bias],
                     sections=["trace"], budget=8)  # fmt: skip
    assert report.config["params"] == ["2.weight", "2.bias"]
    assert report.problem["n_params"] == 21


def test_an_unconverged_run_says_why_in_the_notes_and_the_document():
    model, data = problem()
    report = analyze(model, data, F.cross_entropy, lr=0.5, k=4, k_smallest=4, budget=8,
                     sections=["eigs"])  # fmt: skip
    H = hesse.HessianOperator(hesse.Objective(model, data, loss=F.cross_entropy))
    direct = hesse.eigs(H, 4, which="largest", max_matvecs=8, seed=0)
    largest = report.eigs["largest"]
    assert not direct.converged and largest["converged"] is False
    assert largest["reason"] == direct.reason != ""
    note = next(n for n in report.notes if n.startswith("The 4 largest eigenvalues are NOT"))
    assert direct.reason in note
    gd = report.stability[0]
    assert gd.status in ("inconclusive", "unstable") and "did not converge" in gd.text


def test_prepare_plans_without_computing_a_product():
    model, data = problem()
    objective = hesse.Objective(model, data, loss=F.cross_entropy, params=["0.weight"])
    job = prepare(objective, selection=["0.weight"], k=3, budget=12, sections=["eigs"])
    assert job.describe().startswith("parameters analysed: 24 of 51 (selection: 0.weight)")
    with pytest.raises(ValueError, match="k=30 eigenvalues asked for, but only 24 parameters"):
        prepare(objective, k=30, budget=10)  # the count is checked before the budget


def test_a_hugging_face_classifier_with_its_own_loss_and_a_parameter_subset():
    pytest.importorskip("transformers")
    from hf_models import bert_classifier, classifier_batches

    model, data = bert_classifier(), classifier_batches()  # default attention, own loss
    chosen = ["bert.encoder.layer.1.output.*", "classifier"]
    report = analyze(model, data, params=chosen, lr=0.1, k=3, k_smallest=2, budget=40, steps=8,
                     probes=2)  # fmt: skip
    objective = hesse.Objective(model, data, params=chosen)
    exact = torch.linalg.eigvalsh(hesse.reference.dense_hessian(objective)).flip(0)[:3]
    assert report.eigs["largest"]["values"] == pytest.approx(exact.tolist(), abs=1e-8)
    p = report.problem
    assert (p["loss_name"], p["n_classes"], p["n_samples"]) == ("cross_entropy", 3, 10)
    assert p["n_params"] == objective.dim < p["n_params_total"]
    # one row per transformer sub-layer: the output dense + LayerNorm belong to the MLP
    assert [r.name for r in report.layers] == ["bert.encoder.layer.1.mlp", "classifier"]
    assert report.to_dict()["layers"]["by"] == "block"
    assert report.outliers.expected == 2 and report.ggn["available"]
    assert validate(report.to_dict()) == []
    # a block's λmax only bounds the model's from below: no "stable" verdict from a subset
    assert all(v.status == "unstable" for v in report.stability or ())
    assert any("lower bound of the model's λmax" in note for note in report.notes)
    assert any("No SGD trace verdict" in note for note in report.notes)
