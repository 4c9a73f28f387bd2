"""Local Hugging Face folders and text files (hesse.hf), on tiny models saved in the test."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from hesse import hf

transformers = pytest.importorskip("transformers")
from hf_folders import save_bert  # noqa: E402


def test_task_comes_from_the_architecture(bert_dir, gpt2_dir):
    model, tokenizer, task = hf.load_model(bert_dir)
    assert task == "sequence-classification" and not model.training
    model, tokenizer, task = hf.load_model(gpt2_dir)
    assert task == "causal-lm"
    assert tokenizer.pad_token is not None  # filled in for padding


def test_classification_csv_and_jsonl_give_the_same_batches(bert_dir, tmp_path):
    model, tokenizer, task = hf.load_model(bert_dir)
    rows = [("the cat sat", "pos"), ("a dog ran very fast on the mat", "neg"), ("bad", "1")]
    (tmp_path / "d.csv").write_text("sentence,y\n" + "".join(f"{t},{y}\n" for t, y in rows))
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"sentence": t, "y": y}) + "\n" for t, y in rows)
    )
    kw = dict(
        text_column="sentence", label_column="y", label2id=model.config.label2id, batch_size=2
    )
    a = hf.text_batches(tmp_path / "d.csv", tokenizer, task, **kw)
    b = hf.text_batches(tmp_path / "d.jsonl", tokenizer, task, **kw)
    assert len(a) == 2 and [x["labels"].tolist() for x in a] == [[1, 0], [1]]
    for x, y in zip(a, b, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)
    # padding per batch: the first batch is as long as its longest text (+[CLS], [SEP])
    assert a[0]["input_ids"].shape == (2, 10) and a[1]["input_ids"].shape == (1, 3)
    assert a[0]["attention_mask"][0].tolist() == [1] * 5 + [0] * 5


def test_causal_lm_text_masks_padding_in_labels(gpt2_dir, tmp_path):
    _, tokenizer, task = hf.load_model(gpt2_dir)
    (tmp_path / "t.txt").write_text("the cat sat\n\na dog ran on the mat\n")
    (batch,) = hf.text_batches(tmp_path / "t.txt", tokenizer, task, max_length=6)
    assert batch["input_ids"].shape == (2, 6)  # truncated to max_length
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["labels"][pad] == -100).all()
    assert torch.equal(batch["labels"][~pad], batch["input_ids"][~pad])


def test_masked_lm_masks_a_fixed_share(tmp_path):
    folder = save_bert(tmp_path / "mlm", head="BertForMaskedLM")
    _, tokenizer, task = hf.load_model(folder)
    assert task == "masked-lm"
    (tmp_path / "t.txt").write_text("\n".join(["the cat sat on the mat very fast"] * 40))
    batches = hf.text_batches(tmp_path / "t.txt", tokenizer, task, seed=3)
    again = hf.text_batches(tmp_path / "t.txt", tokenizer, task, seed=3)
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(batches, again, strict=True))
    labels = torch.cat([b["labels"] for b in batches])
    ids = torch.cat([b["input_ids"] for b in batches])
    masked = labels != -100
    assert (ids[masked] == tokenizer.mask_token_id).all()
    assert masked.any(1).all()  # every sequence contributes to the loss
    share = masked.sum() / (40 * 8)
    assert 0.1 < share < 0.3


def test_token_classification_tags_first_token_of_each_word(tmp_path):
    folder = save_bert(tmp_path / "tok", head="BertForTokenClassification", num_labels=3)
    _, tokenizer, task = hf.load_model(folder)
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "the cat sat", "label": "0 1 2"}) + "\n")
    (batch,) = hf.text_batches(tmp_path / "d.jsonl", tokenizer, task)
    assert batch["labels"].tolist() == [[-100, 0, 1, 2, -100]]


@pytest.mark.parametrize(
    "head, task, missing, fix",
    [
        ("BertForMaskedLM", "sequence-classification", "classifier.weight", "task='masked-lm'"),
        ("BertForSequenceClassification", "masked-lm", "cls.predictions", "task='sequence-cl"),
        ("BertModel", "sequence-classification", "classifier.weight", "names BertModel"),
    ],
)
def test_a_head_the_folder_lacks_is_refused_not_drawn_at_random(tmp_path, head, task, missing, fix):
    # today: from_pretrained fills the head with random weights and only logs it
    folder = save_bert(tmp_path / "m", head=head)
    with pytest.raises(ValueError, match=f"holds no weights for .*{missing}.*random") as err:
        hf.load_model(folder, task)
    assert fix in str(err.value) and "--" not in str(err.value)


def test_tasks_are_one_table():
    from hesse.problem import _hf_losses

    assert hf.TASKS is _hf_losses.TASKS
    assert list(hf.TASKS) == [
        "causal-lm",
        "masked-lm",
        "token-classification",
        "sequence-classification",
    ]


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda d: d / "absent", "is not a folder"),
        (lambda d: (d / "config.json").unlink() or d, "lacks the model config"),
        (lambda d: (d / "model.safetensors").unlink() or d, "lacks the model weights"),
        (lambda d: (d / "tokenizer.json").unlink() or d, "lacks the tokenizer"),
    ],
)
def test_broken_folders_are_named(tmp_path, setup, match):
    folder = setup(save_bert(tmp_path / "m"))
    with pytest.raises(ValueError, match=match):
        hf.load_model(folder)


def test_unknown_task_and_bad_data_are_named(bert_dir, tmp_path):
    def message(match, call, *args, **kwargs):
        with pytest.raises(ValueError, match=match) as err:
            call(*args, **kwargs)
        return str(err.value)

    words = [message("task='vision' is unknown", hf.load_model, bert_dir, task="vision")]
    _, tokenizer, task = hf.load_model(bert_dir)
    (tmp_path / "d.csv").write_text("text,label\nthe cat,pos\n")
    batches = functools.partial(hf.text_batches, tmp_path / "d.csv", tokenizer, task)
    words.append(message("no column 'y'.*label_column=", batches, label_column="y"))
    words.append(message("no column 'x'.*text_column=", batches, text_column="x"))
    words.append(message("neither a class name.*label_column=", batches, label2id={"neg": 0}))
    (tmp_path / "d.txt").write_text("the cat\n")
    words.append(
        message("classification needs labels", hf.text_batches, tmp_path / "d.txt", tokenizer, task)
    )
    none = tmp_path / "none.csv"
    words.append(message("path=.*none.csv' is not a file", hf.text_batches, none, tokenizer, task))
    # the functions name their own parameters; the CLI names its flags
    assert not any("--" in w for w in words), words
