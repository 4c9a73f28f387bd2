"""The scripts in examples/ run, and say what the README says they do."""

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_hf_bert_cli_and_python_agree(tmp_path, capsys):
    pytest.importorskip("transformers")
    top = load("hf_bert").main_example(tmp_path)
    doc = json.loads((tmp_path / "report" / "results.json").read_text())
    largest = doc["eigs"]["largest"]
    assert largest["converged"] and largest["values"][0] == pytest.approx(top, rel=1e-6)
    assert doc["problem"]["loss_name"] == "cross_entropy"
    assert doc["layers"]["by"] == "block"
