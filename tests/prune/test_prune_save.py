"""``prune.save`` / ``prune.load``: pruned Hugging Face folders that load, with their bytes."""

import json
import os

import pytest
import torch
from torch import nn

from hesse import Objective
from hesse.prune import load, prune, save

transformers = pytest.importorskip("transformers")
from hf_folders import make_tokenizer  # noqa: E402


def _bert(layers=2, heads=4):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=32, max_position_embeddings=16, num_labels=2,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (8, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    labels = torch.randint(0, 2, (8,), generator=gen)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return model, [batch]


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(1))
    return model, [{"input_ids": ids, "labels": ids}]


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _stored(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.mark.parametrize("make", [_bert, _gpt2])
@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_sparse_folder_loads_with_from_pretrained(make, structure, tmp_path):
    model, data = make()
    plan = prune(Objective(model, data), None, "sparsegpt", structure=structure)
    pruned = plan.apply(model)
    saved = save(pruned, tmp_path / "out")
    back = type(model).from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(back, data[0]), _logits(pruned, data[0]), rtol=1e-5, atol=0)
    stored = _stored(tmp_path / "out")
    assert saved.format == "dense"
    assert saved.params_on_disk == sum(t.numel() for t in stored.values())
    assert saved.zeros == sum(int((t == 0).sum()) for t in stored.values())
    assert saved.zeros >= plan.removed_params
    for name, mask in plan.masks.items():  # the pruned weights are stored as zeros
        assert not stored[name][~mask].any()
    sizes = {f.name: f.stat().st_size for f in (tmp_path / "out").iterdir()}
    assert saved.files == sizes and saved.total_bytes == sum(sizes.values())
    assert saved.weight_bytes == sizes["model.safetensors"]
    info = json.loads((tmp_path / "out" / "config.json").read_text())["hesse_sparsity"]
    assert info["zeros"] == saved.zeros and info["format"] == "dense-with-zeros"


@pytest.mark.parametrize("structure", ["heads", "channels"])
def test_shrunk_folder_is_smaller_and_loads_with_one_line(structure, tmp_path):
    model, data = _bert()
    plan = prune(Objective(model, data), 0.5, "magnitude", structure=structure)
    pruned = plan.apply(model)
    saved = save(pruned, tmp_path / "out", tokenizer=make_tokenizer())
    back = load(tmp_path / "out")
    torch.testing.assert_close(
        _logits(back, data[0]), _logits(pruned, data[0]), rtol=1e-5, atol=1e-7
    )
    dense = save(model, tmp_path / "dense")
    n_pruned = sum(p.numel() for p in pruned.parameters())
    assert saved.format == "shrunk" and dense.format == "dense"
    assert saved.params_on_disk == n_pruned < dense.params_on_disk
    assert dense.params_on_disk - saved.params_on_disk == plan.removed_params
    assert saved.weight_bytes < dense.weight_bytes
    assert "tokenizer.json" in saved.files
    assert sum(p.numel() for p in back.parameters()) == n_pruned
    # a Hugging Face config has one size for all layers: from_pretrained refuses, never guesses
    with pytest.raises(Exception, match="mismatch"):
        type(model).from_pretrained(tmp_path / "out")


def test_heads_sizes_differ_between_layers(tmp_path):
    model, data = _bert(layers=2, heads=4)
    plan = prune(Objective(model, data), 0.25, "magnitude", structure="heads")
    per_layer = [u.module for u in plan.units]
    pruned = plan.apply(model)
    save(pruned, tmp_path / "out")
    back = load(tmp_path / "out")
    heads = [layer.attention.self.num_attention_heads for layer in back.bert.encoder.layer]
    assert heads == [4 - per_layer.count(f"bert.encoder.layer.{i}.attention") for i in range(2)]


def test_load_of_a_plain_folder_is_from_pretrained(tmp_path):
    model, data = _gpt2()
    save(model, tmp_path / "out")
    back = load(tmp_path / "out")
    assert back.lm_head.weight.data_ptr() == back.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(_logits(back, data[0]), _logits(model, data[0]), rtol=0, atol=0)


def test_resave_replaces_files_and_leaves_no_temporary_folder(tmp_path):
    model, data = _bert(layers=1)
    save(model, tmp_path / "out")
    pruned = prune(Objective(model, data), 0.5, "magnitude").apply(model)
    saved = save(pruned, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert _stored(tmp_path / "out")["bert.encoder.layer.0.output.dense.weight"].eq(0).any()
    assert saved.zeros > 0


def test_not_a_hugging_face_model_is_refused(tmp_path):
    with pytest.raises(TypeError, match="torch.save"):
        save(nn.Linear(2, 2), tmp_path / "out")
