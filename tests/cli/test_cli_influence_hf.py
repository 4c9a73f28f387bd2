"""``hesse influence --hf DIR --data train.csv --queries test.csv``: a model's own loss."""

from __future__ import annotations

import csv

import pytest
import torch

from hesse import hf
from hesse.cli import main
from hesse.influence import influence

pytest.importorskip("transformers")

TRAIN = [
    ("the cat sat on the mat", "pos"),
    ("a dog ran very fast", "neg"),
    ("the movie was good", "pos"),
    ("the plot is very bad", "neg"),
    ("a slow dog", "neg"),
    ("good cat", "pos"),
    ("the dog was not good", "neg"),
    ("a very good movie", "pos"),
]
TEST = [("the cat was good", "pos"), ("a bad slow plot", "neg")]


def write_csv(path, rows):
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return path


def run(argv, capsys):
    status = main(argv)
    _, err = capsys.readouterr()
    return status, err


def test_classifier_scores_file_and_top_rows_match_the_api(bert_dir, tmp_path, capsys):
    train, test = write_csv(tmp_path / "train.csv", TRAIN), write_csv(tmp_path / "test.csv", TEST)
    out = tmp_path / "out"
    argv = ["influence", "--hf", str(bert_dir), "--data", str(train), "--queries", str(test)]
    argv += ["--method", "ekfac", "--damping", "0.1", "--top", "2", "--batch-size", "4"]
    status, err = run([*argv, "--quiet", "--out", str(out)], capsys)
    assert status == 0, err
    saved = torch.load(out / "scores.pt", weights_only=False)
    # the same model, data and method through the Python API, the model's own loss
    model, tokenizer, task = hf.load_model(bert_dir)
    label2id = model.config.label2id
    batches = hf.text_batches(train, tokenizer, task, label2id=label2id, batch_size=4)
    queries = hf.text_batches(test, tokenizer, task, label2id=label2id, batch_size=4)
    want = influence(model, batches, queries, ihvp="ekfac", damping=0.1).scores
    assert saved["scores"].shape == (2, 8) and saved["info"]["ihvp"] == "ekfac"
    assert torch.allclose(saved["scores"], want, rtol=1e-4, atol=1e-6 * want.abs().max())
    rows = list(csv.DictReader((out / "top.csv").open()))
    assert len(rows) == 2 * 2 * 2  # queries x (helpful, harmful) x top
    first = [r for r in rows if r["query"] == "0" and r["kind"] == "helpful"]
    best = int(torch.argmax(want[0]))
    assert first[0]["query_text"] == "the cat was good"
    assert int(first[0]["train_index"]) == best and first[0]["train_text"] == TRAIN[best][0]
    assert first[0]["train_label"] == TRAIN[best][1]  # the class name, from the config
    assert (out / "results.json").exists() and (out / "report.html").exists()


def test_causal_lm_sequence_and_token_scores(gpt2_dir, tmp_path, capsys):
    train = tmp_path / "train.txt"
    train.write_text("\n".join(t for t, _ in TRAIN) + "\n")
    test = tmp_path / "test.txt"
    test.write_text("the cat ran fast\n")
    out = tmp_path / "out"
    argv = ["influence", "--hf", str(gpt2_dir), "--data", str(train), "--queries", str(test)]
    argv += ["--method", "ekfac", "--damping", "0.1", "--per-token", "--top", "3"]
    status, err = run([*argv, "--quiet", "--out", str(out)], capsys)
    assert status == 0, err
    saved = torch.load(out / "scores.pt", weights_only=False)
    tokens = saved["token_scores"]
    assert tokens.shape[:2] == (1, 8)
    # an LM's Kronecker factors default to the empirical Fisher's (the exact GGN's cost a
    # backward pass per vocabulary entry and token)
    assert saved["info"]["curvature"] == "fisher"
    assert torch.allclose(tokens.sum(2), saved["scores"], rtol=1e-5, atol=1e-9)
    rows = list(csv.DictReader((out / "top.csv").open()))
    assert rows[0]["query_text"] == "the cat ran fast"
    assert {r["train_text"] for r in rows} <= {t for t, _ in TRAIN}
    counted = int(saved["train_weights"][int(rows[0]["train_index"])])  # shifted labels
    assert rows[0]["train_label"] == f"{counted} tokens"
    # the tokens of the top helpful row that help most: token@position:score, largest first
    j = int(rows[0]["train_index"])
    best = torch.topk(tokens[0, j], 3).indices.tolist()
    shown = rows[0]["top_tokens"].split()
    assert [int(s.split("@")[1].split(":")[0]) for s in shown] == best[: len(shown)]
    words = rows[0]["train_text"].split() + ["[SEP]"]  # the text's words, and its end
    assert shown and all(s.split("@")[0] in words for s in shown)


def test_low_rank_queries_from_the_command_line(bert_dir, tmp_path, capsys):
    train, test = write_csv(tmp_path / "train.csv", TRAIN), write_csv(tmp_path / "test.csv", TEST)
    out = tmp_path / "out"
    argv = ["influence", "--hf", str(bert_dir), "--data", str(train), "--queries", str(test)]
    argv += ["--method", "woodbury", "--damping", "0.1", "--query-rank", "1", "--quiet"]
    status, err = run([*argv, "--out", str(out)], capsys)
    assert status == 0, err
    info = torch.load(out / "scores.pt", weights_only=False)["info"]
    assert info["query_rank"] == 1 and 0 < info["query_rank_error"] < 1
    status, err = run([*argv[:-3], "--query-rank", "0", "--out", str(out)], capsys)
    assert status == 2 and "--query-rank must be >= 1" in err


def test_memory_that_cannot_hold_one_gradient_is_refused(bert_dir, tmp_path, capsys):
    train, test = write_csv(tmp_path / "train.csv", TRAIN), write_csv(tmp_path / "test.csv", TEST)
    argv = ["influence", "--hf", str(bert_dir), "--data", str(train), "--queries", str(test)]
    argv += ["--damping", "0.1", "--max-memory", "10K", "--quiet", "--out", str(tmp_path / "o")]
    status, err = run(argv, capsys)
    assert status == 2
    assert "--max-memory" in err and "one per-sample gradient" in err
