"""``hesse prune``: the command line end to end on a small model, and its usage errors."""

import json

import pytest

from hesse.cli import main

MODEL = ["--model", "prune_cases:cli_model", "--data", "prune_cases:cli_data"]
TEST = ["--test-data", "prune_cases:cli_test_data"]


@pytest.mark.slow
def test_prune_command_writes_the_measured_table_and_plot(tmp_path, capsys):
    out = tmp_path / "pruned"
    argv = ["prune", *MODEL, *TEST, "--sparsity", "0.5,0.8", "--out", str(out)]
    assert main([*argv, "--method", "magnitude,mfac,layer_obs"]) == 0
    doc = json.loads((out / "results.json").read_text())["results"]
    rows = doc["results"]
    assert [(r["method"], r["sparsity"]) for r in rows] == [
        (m, s) for m in ("magnitude", "mfac", "layer_obs") for s in (0.5, 0.8)
    ]
    assert all(r["test_loss"] is not None and 0 <= r["test_accuracy"] <= 1 for r in rows)
    assert rows[2]["relative_damping"] == [0.01] and rows[0]["damping"] == []
    assert doc["dense"]["train"][0] < min(r["train_loss"] for r in rows)
    assert (out / "prune.png").stat().st_size > 1000 and (out / "report.html").is_file()
    printed = capsys.readouterr().out
    assert "layer_obs" in printed and "test loss" in printed


def test_pattern_and_gradual_steps(tmp_path):
    out = tmp_path / "nm"
    argv = ["prune", *MODEL, "--structure", "2:4", "--recompute", "2", "--out", str(out)]
    assert main([*argv, "--method", "mfac", "--curvature", "fisher", "--quiet"]) == 0
    rows = json.loads((out / "results.json").read_text())["results"]["results"]
    assert len(rows) == 1 and rows[0]["sparsity"] == 0.5 and len(rows[0]["damping"]) == 2
    assert rows[0]["skipped"] == []  # 8 and 12 inputs: both divisible by 4


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--sparsity", "1.2"], "--sparsity '1.2'"),
        (["--method", "snip"], "method must be one of"),
        (["--method", "nvit", "--structure", "heads"], "no heads found"),
    ],
)
def test_usage_errors_exit_2(tmp_path, capsys, extra, message):
    assert main(["prune", *MODEL, "--out", str(tmp_path / "x"), "--quiet", *extra]) == 2
    assert message in capsys.readouterr().err
