"""The scripts in examples/ run, and say what the README says they do."""

import json

import pytest

from example_scripts import load


@pytest.mark.slow
def test_hf_bert_cli_and_python_agree(tmp_path, capsys):
    pytest.importorskip("transformers")
    top = load("hf_bert").main_example(tmp_path)
    doc = json.loads((tmp_path / "report" / "results.json").read_text())
    largest = doc["eigs"]["largest"]
    assert largest["converged"] and largest["values"][0] == pytest.approx(top, rel=1e-6)
    assert doc["problem"]["loss_name"] == "cross_entropy"
    assert doc["layers"]["by"] == "block"
