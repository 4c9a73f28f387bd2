"""``hesse influence``: scores, top points, picture and diagnostics; bad options exit 2."""

import json

import pytest

from hesse.cli import main

SOURCE = [
    "--model",
    "influence_problems:cli_model",
    "--data",
    "influence_problems:cli_data",
    "--test-data",
    "influence_problems:cli_test",
    "--dtype",
    "float64",
    "--quiet",
]


def run(tmp_path, *extra):
    status = main(["influence", *SOURCE, "--out", str(tmp_path), *extra])
    doc = json.loads((tmp_path / "results.json").read_text()) if status == 0 else None
    return status, doc


@pytest.mark.slow
def test_scores_top_points_picture_and_diagnostics(tmp_path):
    status, doc = run(tmp_path, "--query", "0:3", "--top", "2", "--damping", "0.1")
    assert status == 0
    res = doc["results"]
    assert res["query_indices"] == [0, 1, 2]
    assert len(res["scores"]) == 3 and len(res["scores"][0]) == 48
    row = res["queries"][1]
    scores = res["scores"][1]
    assert row["helpful"][0] == max(range(48), key=scores.__getitem__)
    assert row["harmful"][0] == min(range(48), key=scores.__getitem__)
    assert res["influence"]["inverse"]["converged"] and res["influence"]["ihvp"] == "cg"
    assert (tmp_path / "influential.png").stat().st_size > 1000
    assert "data:image/png" in (tmp_path / "report.html").read_text()


def test_damping_is_chosen_from_the_measured_spectrum(tmp_path):
    status, doc = run(tmp_path, "--query", "4,7", "--ihvp", "exact")
    info = doc["results"]["influence"]
    assert status == 0 and info["lam_min"] > -1e-8  # untrained linear model: convex loss
    assert info["auto_damping"] == pytest.approx(
        0.01 * info["lam_max"] + 1.1 * max(0, -info["lam_min"])
    )
    assert info["inverse"]["damping"] == info["auto_damping"]


def test_woodbury_inverts_the_empirical_fisher(tmp_path):
    status, doc = run(tmp_path, "--query", "0:2", "--ihvp", "woodbury", "--damping", "0.01")
    assert status == 0 and doc["results"]["influence"]["curvature"] == "fisher"


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--query", "20:30"], "--query"),
        (["--query", "a,b"], "--query"),
        (["--damping", "-1"], "--damping"),
        (["--top", "0"], "--top"),
        (["--ihvp", "woodbury", "--curvature", "ggn"], "--ihvp woodbury"),
    ],
)
def test_bad_options_exit_2(tmp_path, capsys, extra, words):
    status, _ = run(tmp_path, *extra)
    assert status == 2 and words in capsys.readouterr().err
