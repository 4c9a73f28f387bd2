import json

import pytest
from quant_models import batches, mlp

from hesse.cli import main


def run(tmp_path, *extra):
    argv = ["quantize", "--model", "quant_models:mlp", "--data", "quant_models:batches",
            "--test-data", "quant_models:batches", "--budget", "10", "--quiet",
            "--out", str(tmp_path), *extra]  # fmt: skip
    return main(argv)


def test_quantize_writes_the_sensitivity_bits_frontier_and_measured_table(tmp_path):
    assert run(tmp_path, "--bits", "2,4,8", "--size", "0.2", "--fixed", "2=8") == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    results = doc["results"]
    alloc = results["allocation"]
    assert alloc["bits"]["2"] == 8 and alloc["size_bytes"] <= alloc["budget"]
    assert alloc["budget"] == pytest.approx(0.2 * 4 * (24 + 18))
    configs = results["configurations"]
    assert set(configs) >= {"float", "Hessian (Ω-optimal)"}
    assert [r["name"] for r in results["sensitivity"]["layers"]] == ["0", "2"]
    assert results["frontier"] and all("loss" in p for p in results["frontier"])
    titles = [s["title"] for s in doc["sections"]]
    assert titles[0].startswith("Sensitivity") and any("Frontier" in t for t in titles)
    assert (tmp_path / "frontier.png").stat().st_size > 1000
    assert (tmp_path / "report.html").is_file()
    float_loss = configs["float"]["loss"]
    import torch.nn.functional as F

    from hesse.problem._evaluate import evaluate

    assert float_loss == pytest.approx(evaluate(mlp(), batches(), F.cross_entropy).loss)


def test_bops_budget_eig_method_and_layers(tmp_path):
    assert run(tmp_path, "--bops", "0.2", "--method", "eig", "--layers", "2") == 0
    alloc = json.loads((tmp_path / "results.json").read_text())["results"]["allocation"]
    assert alloc["cost"] == "bops" and alloc["bops"] <= alloc["budget"]
    assert list(alloc["bits"]) == ["2"]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (("--bits", "0,4"), "--bits '0,4': give widths from 1 to 16"),
        (("--size", "0.001"), "smallest feasible budget"),
        (("--size", "0.1", "--bops", "0.1"), "one budget, not both"),
        (("--granularity", "group", "--group-size", "4"), "--group-size 4 does not divide"),
        (("--fixed", "head=8"), "unknown layer 'head'"),
        (("--fixed", "2:8"), "LAYER=BITS"),
        (("--layers", "fc*"), "unknown layer 'fc*'"),
    ],
)
def test_bad_options_exit_2_with_a_message(tmp_path, capsys, extra, words):
    assert run(tmp_path, *extra) == 2
    assert words in capsys.readouterr().err
