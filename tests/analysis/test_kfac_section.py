"""``analyze(curvature="kfac" | "ekfac")``: the Kronecker operator's report and its gap section.

The model is small enough (d = 20) that Hutch++ with a budget of 3d sketches the whole space,
so every estimate of the gap section is exact and is compared with dense float64 references.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hesse
from hesse.analysis import analyze
from hesse.analysis._run import section_products
from hesse.analysis.options import Options
from hesse.linalg.gap import principal_angles
from hesse.report import render_html, validate
from hesse.report.text import render_text

K_TOP, BUDGET = 2, 66  # BUDGET >= 3 d: the Hutch++ sketch spans the space, its estimates are exact


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 1, 2), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3)).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 1, 3, 3, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (12,), generator=gen)
    return model.eval(), [(x[:7], y[:7]), (x[7:], y[7:])]


def run(curvature):
    model, data = problem()
    sections = ("eigs", "trace", "layers", "ggn", "kfac")
    report = analyze(model, data, F.cross_entropy, curvature=curvature, sections=sections,
                     k=K_TOP, k_smallest=2, budget=BUDGET, seed=0)  # fmt: skip
    obj = hesse.Objective(model, data, loss=F.cross_entropy)
    build = {"kfac": hesse.KFACOperator, "ekfac": hesse.EKFACOperator}[curvature]
    return report, hesse.reference.dense_ggn(obj), build(obj).to_dense(), obj


@pytest.fixture(scope="module", params=["kfac", "ekfac"])
def case(request):
    return request.param, *run(request.param)


def test_the_sections_describe_the_kronecker_matrix(case):
    _, report, _, K, _ = case
    values = torch.linalg.eigvalsh(K)
    assert report.eigs["largest"]["values"] == pytest.approx(values.flip(0)[:K_TOP].tolist(),
                                                             abs=1e-8)  # fmt: skip
    t = report.trace  # from the factors: exact, no product
    assert t["value"] == pytest.approx(K.trace().item(), rel=1e-12)
    assert (t["method"], t["stderr"], t["n_matvecs"]) == ("factors", 0.0, 0)
    assert not report.ggn["available"] and "kfac section" in report.ggn["reason"]
    assert [row.name for row in report.layers] == ["0", "3"]


def test_the_gap_section_equals_the_dense_references(case):
    curvature, report, G, K, obj = case
    q = report.kfac
    name = {"kfac": "KFACOperator", "ekfac": "EKFACOperator"}[curvature]
    assert (q["approximation"], q["kind"], q["approx"], q["exact"]) == (name, "exact", "expand",
                                                                         "ggn")  # fmt: skip
    eg, vg = torch.linalg.eigh(G)
    ek, vk = torch.linalg.eigh(K)
    top_g, top_k = eg.flip(0)[:K_TOP], ek.flip(0)[:K_TOP]
    assert q["exact_eigenvalues"] == pytest.approx(top_g.tolist(), abs=1e-8)
    assert q["approx_eigenvalues"] == pytest.approx(top_k.tolist(), abs=1e-8)
    errors = ((top_k - top_g).abs() / top_g).tolist()
    assert q["eigenvalue_errors"] == pytest.approx(errors, abs=1e-6)
    angles = principal_angles(vg[:, -K_TOP:], vk[:, -K_TOP:])
    assert q["principal_angles"] == pytest.approx(angles.tolist(), abs=1e-5)
    slices = obj.space.slices()
    for b in q["blocks"]:
        index = torch.arange(slices[f"{b['name']}.weight"].start, slices[f"{b['name']}.bias"].stop)
        _check_block(b, G[index][:, index], K[index][:, index])
    _check_block(q["whole"], G, K)
    assert [b["name"] for b in q["blocks"]] == ["0", "3"] and q["by"] == "module"


def _check_block(b, G, K):
    D = G - K
    assert b["dim"] == G.shape[0]
    assert b["trace"]["value"] == pytest.approx(D.trace().item(), abs=1e-8)
    assert b["approx_trace"] == pytest.approx(K.trace().item(), rel=1e-10)
    assert b["frobenius"]["value"] == pytest.approx(torch.linalg.norm(D).item(), rel=1e-6)
    assert b["exact_frobenius"]["value"] == pytest.approx(torch.linalg.norm(G).item(), rel=1e-6)
    relative = (torch.linalg.norm(D) / torch.linalg.norm(G)).item()
    assert b["relative_frobenius"] == pytest.approx(relative, rel=1e-6)


def test_ekfac_keeps_each_blocks_trace_and_kfac_does_not(case):
    curvature, report, _, _, _ = case
    gaps = [abs(b["trace"]["value"]) for b in report.kfac["blocks"]]
    # EKFAC's scalings are the GGN block's diagonal in its eigenbasis, so the traces agree
    assert max(gaps) < 1e-8 if curvature == "ekfac" else max(gaps) > 1e-3


def test_the_document_is_valid_and_rendered(case):
    curvature, report, _, _, _ = case
    doc = report.to_dict()
    assert validate(doc) == [] and doc["kfac"] == report.kfac
    text = render_text(doc)
    assert "against the exact GGN" in text and "Tr(K) =" in text and "‖G−K‖/‖G‖" in text
    rows = [line.split()[0] for line in text.splitlines()[-len(doc["kfac"]["blocks"]) - 1 :]]
    assert rows == ["0", "3", "whole"]
    assert "timings" in doc and doc["timings"]["factors"] >= 0
    html = render_html(doc, {})
    assert "Kronecker factors against the exact GGN" in html and "tr(G − K)" in html


def test_the_product_total_covers_the_gap_section(case):
    curvature, report, _, _, obj = case
    opts = Options(curvature=curvature, sections=("kfac",), k=K_TOP, budget=BUDGET)
    total = section_products(opts, obj.space)["kfac"]
    assert total == BUDGET * (1 + 3 * 3) and report.kfac["n_matvecs"] <= total


def test_an_exact_zero_ratio_is_null_in_the_document():
    from hesse.analysis._documents import _finite

    assert _finite(math.inf) is None and _finite(0.5) == 0.5


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_other_curvatures_have_no_gap_section(curvature):
    model, data = problem()
    report = analyze(model, data, F.cross_entropy, curvature=curvature, sections=["trace", "kfac"],
                     budget=8)  # fmt: skip
    assert report.kfac is None and "kfac" not in report.to_dict()
    opts = Options(curvature=curvature, sections=("trace", "kfac"), budget=8)
    assert "kfac" not in section_products(opts, hesse.Objective(model, data, F.cross_entropy).space)
