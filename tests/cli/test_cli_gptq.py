"""``hesse quantize --method gptq``: uniform and allocated widths, saved folders that reload."""

from __future__ import annotations

import json

import pytest

from hesse.cli import main

transformers = pytest.importorskip("transformers")
from hf_folders import save_bert  # noqa: E402

SENTENCES = ["the cat sat on the mat", "a dog ran very fast", "the movie was good",
             "the plot is very bad", "a slow dog", "good cat"]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    csv = root / "calib.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate(SENTENCES)))
    return save_bert(
        root / "bert", id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1}
    ), csv


def _doc(out):
    return json.loads((out / "results.json").read_text())["results"]


def test_uniform_bits_saves_a_folder_that_reloads(folder, tmp_path, capsys):
    bert, csv = folder
    argv = ["quantize", "--hf", str(bert), "--data", str(csv), "--method", "gptq", "--bits", "4",
            "--group-size", "8", "--save", str(tmp_path / "q"),
            "--out", str(tmp_path / "out"),
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    doc = _doc(tmp_path / "out")
    assert {layer["bits"] for layer in doc["gptq"]["layers"]} == {4}
    assert doc["saved"]["packed_bytes"] > 0
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "q")
    config = back.config.quantization_config
    assert config is not None
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "q")
    assert tok("good cat")["input_ids"]
    narrow = [*argv[:11], "--narrow-range", "--out", str(tmp_path / "narrow"), "--quiet"]
    assert main(narrow) == 0  # hesse's old grid, codes -L..L: other weights, other errors
    errors = [[r["error"] for r in _doc(tmp_path / d)["gptq"]["layers"]] for d in ("out", "narrow")]
    assert errors[0] != errors[1] and len(errors[0]) == len(errors[1])


def test_size_budget_allocates_mixed_widths(folder, tmp_path, capsys):
    bert, csv = folder
    argv = ["quantize", "--hf", str(bert), "--data", str(csv), "--method", "gptq",
            "--bits", "2,4,8", "--size", "0.14", "--group-size", "8", "--budget", "20",
            "--out", str(tmp_path / "out"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    doc = _doc(tmp_path / "out")
    widths = [layer["bits"] for layer in doc["gptq"]["layers"]]
    assert (
        set(widths) <= {2, 4, 8} and doc["allocation"]["size_bytes"] <= doc["allocation"]["budget"]
    )
    assert "gptq" in doc["measured"] and "float" in doc["measured"]


def test_save_needs_gptq(folder, tmp_path, capsys):
    bert, csv = folder
    argv = ["quantize", "--hf", str(bert), "--data", str(csv), "--save", str(tmp_path / "q"),
            "--quiet"]  # fmt: skip
    assert main(argv) == 2
    assert "--method gptq" in capsys.readouterr().err
