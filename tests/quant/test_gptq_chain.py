"""GPTQ's block chain (stored block inputs, shared with SparseGPT) equals full passes per block."""

from __future__ import annotations

import pytest
import torch
import transformers

from hesse.quant import _calibrate, gptq
from hf_models import bert_classifier


def _bert():
    return bert_classifier(
        torch.float64, "eager", hidden=16, layers=3, intermediate=32, vocab=30,
        max_positions=16, num_labels=2, init_range=0.02,
    )  # fmt: skip


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=30, n_positions=16, n_embd=16, n_layer=3, n_head=2)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def _calib():
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        ids = torch.randint(0, 30, (4, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 9:] = 0  # padding travels with the stored block inputs
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.mark.parametrize("make", [_bert, _gpt2])
def test_chain_equals_block_by_block_full_passes(make, monkeypatch):
    model, calib = make(), _calib()
    used = []
    chain_of = _calibrate.chain_of

    def spy(*args):
        found = chain_of(*args)
        used.append(found is not None)
        return found

    monkeypatch.setattr(_calibrate, "chain_of", spy)
    chained = gptq(model, calib, bits=3, group_size=8, embeddings=None)
    monkeypatch.setattr(_calibrate, "chain_of", lambda *args: None)
    rerun = gptq(model, calib, bits=3, group_size=8, embeddings=None)
    assert used == [True]
    a, b = dict(chained.named_parameters()), dict(rerun.named_parameters())
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-12, msg=name)
    layers = chained.hesse_quantization.layers
    assert [x.inputs for x in layers] == [x.inputs for x in rerun.hesse_quantization.layers]
    assert len(layers) == (20 if make is _bert else 12)  # BERT 6 per block, pooler, classifier


def test_a_late_block_alone_runs_the_chain_up_to_it():
    model, calib = _bert(), _calib()
    name = "bert.encoder.layer.2.output.dense"
    chained = gptq(model, calib, bits={name: 2}, group_size=8, embeddings=None)
    ref = gptq(model, calib, bits={name: 2}, group_size=8, embeddings=None, sequential=False)
    w = dict(chained.named_modules())[name].weight
    torch.testing.assert_close(w, dict(ref.named_modules())[name].weight, rtol=0, atol=1e-12)
    assert not torch.equal(w, dict(model.named_modules())[name].weight)
