"""``hesse analyze --curvature kfac | ekfac`` on the digits demo (Conv2d + Linear)."""

import json

import pytest
from cli_env import digits_cache  # noqa: F401 (an autouse fixture: the demo's cache)

from hesse.cli import main
from hesse.report import validate

SMALL = ["--k", "3", "--budget", "12", "--steps", "6", "--probes", "2", "--samples", "100"]
BLOCKS = ["conv1", "conv2", "fc1", "fc2"]


def run(argv, capsys):
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def test_analyze_kfac_prints_the_gap_table_and_writes_it(tmp_path, capsys):
    argv = ["analyze", "--demo", "digits", "--curvature", "kfac", *SMALL, "--out", str(tmp_path)]
    status, out, err = run(argv, capsys)
    assert status == 0, err
    # the first product is with the factors: no time estimate scaled from it
    assert "(with the factors;" in err and "so at most ~" not in err
    assert "KFACOperator (kind exact, expand) against the exact GGN" in out
    assert "Tr(K) = " in out and "factors, 0 products" in out
    table = out[out.index("‖G−K‖/‖G‖") :].splitlines()[1:6]
    assert [line.split()[0] for line in table] == [*BLOCKS, "whole"]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert validate(doc) == [] and doc["config"]["curvature"] == "kfac"
    q = doc["kfac"]
    assert [b["name"] for b in q["blocks"]] == BLOCKS and q["whole"]["dim"] == 3658
    assert len(q["exact_eigenvalues"]) == len(q["principal_angles"]) == 3
    assert all(0 < b["relative_frobenius"] for b in [*q["blocks"], q["whole"]])
    assert doc["trace"]["value"] == pytest.approx(q["whole"]["approx_trace"])
    assert doc["plan"]["factor_bytes"] > 0 and doc["plan"]["curvature"] == "kfac"
    html = (tmp_path / "report.html").read_text()
    assert "Kronecker factors against the exact GGN" in html and ">fc2<" in html


def test_analyze_ekfac_and_eigs_kfac(capsys):
    argv = ["analyze", "--demo", "digits", "--curvature", "ekfac", *SMALL, "--json", "--quiet"]
    status, out, err = run(argv, capsys)
    assert status == 0, err
    doc = json.loads(out)
    assert validate(doc) == [] and doc["kfac"]["approximation"] == "EKFACOperator"
    # EKFAC keeps each block's trace (its scalings are the GGN's diagonal in its eigenbasis)
    for b in doc["kfac"]["blocks"]:
        assert abs(b["trace"]["value"]) <= 3 * b["trace"]["stderr"] + 1e-4 * b["approx_trace"]
    argv = ["eigs", "--demo", "digits", "--curvature", "kfac", *SMALL, "--json", "--quiet"]
    status, out, err = run(argv, capsys)
    assert status == 0, err
    assert "kfac" not in json.loads(out)  # only analyze measures the gap


def test_max_memory_below_the_factors_is_refused_naming_the_largest(capsys):
    argv = ["analyze", "--demo", "digits", "--curvature", "kfac", *SMALL, "--max-memory", "1K"]
    status, _, err = run(argv, capsys)
    assert status == 2 and err.count("\n") == 1
    assert "The KFAC factors alone take 48.7 kB" in err
    assert "layer conv2: input factor 73 x 73 (21.3 kB)" in err
    assert "(--params)" in err and "--curvature ggn" in err and "raise --max-memory" in err
