"""``hesse ... --hf DIR --data FILE``: local Hugging Face folders and text files from the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import hesse
from hesse import hf
from hesse.cli import main

pytest.importorskip("transformers")
from hf_folders import save_bert  # noqa: E402

FAST = ["--budget", "30", "--steps", "4", "--probes", "2", "--quiet", "--json"]
SENTENCES = [
    ("the cat sat on the mat", "pos"),
    ("a dog ran very fast", "neg"),
    ("the movie was good", "pos"),
    ("the plot is very bad", "neg"),
    ("a slow dog", "neg"),
    ("good cat", "pos"),
]


def run(argv, capsys):
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def data(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("sentence,label\n" + "".join(f"{t},{y}\n" for t, y in SENTENCES))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in SENTENCES))
    txt = tmp_path / "d.txt"
    txt.write_text("\n".join(t for t, _ in SENTENCES) + "\n")
    return {"csv": csv, "jsonl": jsonl, "txt": txt}


def api_top(folder, path, params, k, **columns):
    """The top eigenvalues of the same model, data and parameters through the Python API."""
    model, tokenizer, task = hf.load_model(folder)
    label2id = model.config.label2id
    batches = hf.text_batches(path, tokenizer, task, label2id=label2id, batch_size=4, **columns)
    objective = hesse.Objective(model, batches, params=params)
    return hesse.eigs(hesse.HessianOperator(objective), k, max_matvecs=30).values


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_classifier_report_matches_the_api(bert_dir, data, tmp_path, capsys, kind):
    params = "classifier.*,bert.pooler.*"
    columns = {"text_column": "sentence"} if kind == "csv" else {}
    argv = ["eigs", "--hf", str(bert_dir), "--data", str(data[kind]), "--params", params]
    argv += ["--k", "3", "--batch-size", "4", *FAST, "--out", str(tmp_path / "out")]
    argv += ["--text-column", columns.get("text_column", "text")]
    status, out, err = run(argv, capsys)
    assert status == 0, err
    doc = json.loads(out)
    assert doc["problem"]["loss_name"] == "cross_entropy"  # the model's own loss, recognised
    assert doc["problem"]["n_params"] == 2 * 16 + 2 + 16 * 16 + 16
    expected = api_top(bert_dir, data[kind], ["classifier.*", "bert.pooler.*"], 3, **columns)
    got = torch.tensor(doc["eigs"]["largest"]["values"], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_causal_lm_from_a_text_file(gpt2_dir, data, tmp_path, capsys):
    argv = ["analyze", "--hf", str(gpt2_dir), "--data", str(data["txt"]), "--k", "3"]
    argv += ["--params", "transformer.h.0.mlp.*", "--batch-size", "4", *FAST]
    status, out, err = run([*argv, "--out", str(tmp_path / "out")], capsys)
    assert status == 0, err
    doc = json.loads(out)
    assert doc["ggn"]["available"]  # the inferred token cross-entropy gives the GGN
    assert doc["layers"]["by"] == "block"
    assert [row["name"] for row in doc["layers"]["rows"]] == ["transformer.h.0.mlp"]
    expected = api_top(gpt2_dir, data["txt"], ["transformer.h.0.mlp.*"], 3)
    got = torch.tensor(doc["eigs"]["largest"]["values"], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_plan_and_first_product_lines(bert_dir, data, tmp_path, capsys):
    argv = ["trace", "--hf", str(bert_dir), "--data", str(data["jsonl"]), "--budget", "6"]
    status, out, err = run([*argv, "--params", "classifier", "--out", str(tmp_path)], capsys)
    assert status == 0, err
    assert "parameters analysed: 34 of" in err and "memory" in err
    assert "first product took" in err and "at most 6 products" in err


def test_max_time_reports_partial_sections(bert_dir, data, tmp_path, capsys):
    argv = ["analyze", "--hf", str(bert_dir), "--data", str(data["jsonl"]), *FAST, "--k", "2"]
    argv += ["--params", "classifier", "--max-time", "0", "--out", str(tmp_path)]
    status, out, err = run(argv, capsys)
    assert status == 0, err
    doc = json.loads(out)
    assert doc["partial"] == ["eigs", "trace", "density", "layers", "ggn"]
    assert any("time budget" in note for note in doc["notes"])
    assert "eigs" not in doc


def test_optimizer_changes_the_threshold(bert_dir, data, tmp_path, capsys):
    argv = ["eigs", "--hf", str(bert_dir), "--data", str(data["jsonl"]), *FAST, "--k", "1"]
    argv += ["--lr", "0.1", "--out", str(tmp_path)]  # all parameters: a subset gets no verdict
    status, out, _ = run([*argv, "--optimizer", "momentum", "--momentum", "0.5"], capsys)
    assert status == 0
    assert json.loads(out)["stability"]["threshold"] == pytest.approx(30.0)  # (2 + 1) / 0.1
    status, out, _ = run([*argv, "--optimizer", "adam"], capsys)
    doc = json.loads(out)
    assert "stability" not in doc and any("Adam" in note for note in doc["notes"])


@pytest.mark.parametrize(
    "change, extra, words",
    [
        (lambda d: d / "absent", [], "not a folder"),
        (lambda d: (d / "tokenizer.json").unlink() or d, [], "tokenizer"),
        (lambda d: (d / "model.safetensors").unlink() or d, [], "weights"),
        (lambda d: d, ["--hf-task", "masked-lm"], "masked"),
        (lambda d: d, ["--label-column", "y"], "'y'"),
        (lambda d: d, ["--params", "encoder.nothing"], "encoder.nothing"),
    ],
)
def test_newcomer_mistakes_get_one_line_and_exit_2(tmp_path, data, capsys, change, extra, words):
    labels = {"id2label": {0: "neg", 1: "pos"}, "label2id": {"neg": 0, "pos": 1}}
    folder = change(save_bert(tmp_path / "m", **labels))
    argv = ["eigs", "--hf", str(folder), "--data", str(data["csv"]), "--text-column"]
    argv += ["sentence", *FAST, "--k", "2", *extra, "--out", str(tmp_path)]
    status, out, err = run(argv, capsys)
    assert status == 2
    message = err.strip().splitlines()[-1]  # earlier lines: the test's own save_pretrained
    assert message.startswith("hesse eigs: error:") and "Traceback" not in err
    assert words in message


def test_unknown_task_is_refused_by_the_parser(bert_dir, data, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eigs", "--hf", str(bert_dir), "--data", str(data["csv"]), "--hf-task", "vision"])
    assert exit_.value.code == 2
    assert "invalid choice: 'vision'" in capsys.readouterr().err


def test_missing_data_file(bert_dir, tmp_path, capsys):
    argv = ["eigs", "--hf", str(bert_dir), "--data", str(tmp_path / "none.csv"), *FAST]
    status, _, err = run(argv, capsys)
    assert status == 2 and "none.csv" in err


def test_groups_make_the_rows_of_the_layer_table(bert_dir, data, tmp_path, capsys):
    argv = ["analyze", "--hf", str(bert_dir), "--data", str(data["jsonl"]), *FAST, "--k", "2"]
    argv += ["--params", "bert.encoder.*,bert.pooler.*,classifier.*", "--out", str(tmp_path)]
    status, out, err = run([*argv, "--groups", "head=bert.pooler,classifier"], capsys)
    assert status == 0, err
    layers = json.loads(out)["layers"]
    assert layers["by"] == "groups" and [r["name"] for r in layers["rows"]] == ["head", "(rest)"]
    assert layers["rows"][0]["n_params"] == 16 * 16 + 16 + 2 * 16 + 2
    status, out, err = run([*argv, "--layers-by", "module"], capsys)
    assert status == 0 and json.loads(out)["layers"]["by"] == "module"
    status, _, err = run([*argv, "--groups", "a=classifier;b=classifier.weight"], capsys)
    assert status == 2 and "classifier.weight" in err.splitlines()[-1]
