"""``hesse prune --hf DIR --data FILE --method sparsegpt --save OUT``: folders that load."""

from __future__ import annotations

import json

import pytest
import torch

import hesse
from hesse import hf
from hesse.cli import main

transformers = pytest.importorskip("transformers")

TEXT = ["the cat sat on the mat", "a dog ran very fast", "the movie was good", "the plot is bad"]


@pytest.fixture
def csv(tmp_path):
    path = tmp_path / "calib.csv"
    labels = ["pos", "neg", "pos", "neg"]
    path.write_text(
        "text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(TEXT, labels, strict=True))
    )
    return path


def _run(argv, capsys):
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def _api_plan(folder, path, structure):
    model, tokenizer, task = hf.load_model(folder)
    batches = hf.text_batches(path, tokenizer, task, label2id=model.config.label2id)
    plan = hesse.prune.prune(
        hesse.Objective(model, batches), None, "sparsegpt", structure=structure
    )
    return model, plan


@pytest.mark.parametrize("folder", ["bert_dir", "gpt2_dir"])
def test_sparsegpt_2_4_saves_the_api_model(folder, csv, tmp_path, capsys, request):
    folder = request.getfixturevalue(folder)
    out = tmp_path / "pruned"
    argv = ["prune", "--hf", str(folder), "--data", str(csv), "--method", "sparsegpt"]
    argv += ["--structure", "2:4", "--save", str(out), "--out", str(tmp_path / "r"), "--json"]
    status, stdout, err = _run(argv, capsys)
    assert status == 0, err
    row = json.loads(stdout)["results"]["results"][0]
    assert row["saved"]["load"] == "from_pretrained"
    assert row["saved"]["total_bytes"] == sum(f.stat().st_size for f in out.iterdir())
    assert row["calibration"]["sequential"] and row["calibration"]["peak_bytes"] > 0
    model, plan = _api_plan(folder, csv, "2:4")
    back = type(model).from_pretrained(out)
    params = dict(back.named_parameters())
    for name, w in plan.weights.items():
        torch.testing.assert_close(params[name].detach(), w, rtol=1e-6, atol=1e-7)
    assert (out / "tokenizer.json").exists()


def test_peak_and_folder_are_printed(bert_dir, csv, tmp_path, capsys):
    argv = ["prune", "--hf", str(bert_dir), "--data", str(csv), "--method", "sparsegpt"]
    argv += ["--sparsity", "0.5", "--save", str(tmp_path / "p"), "--out", str(tmp_path / "r")]
    status, stdout, err = _run(argv, capsys)
    assert status == 0, err
    assert "MiB of layer inputs and Hessians" in stdout and "load it with from_pretrained" in stdout


def test_channels_save_shrunk_and_load_with_hesse(bert_dir, csv, tmp_path, capsys):
    out = tmp_path / "shrunk"
    argv = ["prune", "--hf", str(bert_dir), "--data", str(csv), "--structure", "channels"]
    argv += ["--method", "magnitude", "--sparsity", "0.5", "--save", str(out), "--quiet"]
    status, _, err = _run([*argv, "--out", str(tmp_path / "r")], capsys)
    assert status == 0, err
    back = hesse.prune.load(out)
    assert back.bert.encoder.layer[0].intermediate.dense.out_features == 12  # of 24


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--method", "sparsegpt,magnitude"], "one method and one sparsity"),
        (["--sparsity", "0.5,0.7"], "one method and one sparsity"),
    ],
)
def test_save_needs_one_model(bert_dir, csv, tmp_path, capsys, extra, words):
    argv = ["prune", "--hf", str(bert_dir), "--data", str(csv), "--save", str(tmp_path / "p")]
    status, _, err = _run([*argv, *extra], capsys)
    assert status == 2 and words in err
