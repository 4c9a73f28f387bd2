"""hesse.quant.gptq on whole models: sequential calibration, widths, embeddings, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hesse.quant import gptq
from hesse.quant._calibrate import groups, hessians
from hesse.quant._gptq_layer import gptq_layer
from hesse.quant._layers import _scan, quantizable
from hf_models import bert_classifier


def _net():
    torch.manual_seed(0)
    layers = [nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)]
    return nn.Sequential(*layers).double()


def _bert():
    return bert_classifier(
        torch.float32, "eager", hidden=16, layers=2, intermediate=32, vocab=30,
        max_positions=16, num_labels=2, init_range=0.02,
    )  # fmt: skip


def _calib(n=2):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 30, (4, 12), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def test_sequential_layers_see_inputs_through_quantized_layers():
    net, X = _net(), torch.randn(64, 8, dtype=torch.float64)
    q = gptq(net, [X], bits=3, group_size=8)
    assert torch.equal(net[0].weight, _net()[0].weight)  # the model is untouched
    first = gptq_layer(net[0].weight, 2 * X.T @ X / 64, bits=3, group_size=8, scale_dtype=X.dtype)
    assert torch.equal(q[0].weight, first.weight)
    H2 = torch.tanh(q[0](X))  # the second layer's inputs through the quantized first
    second = gptq_layer(
        net[2].weight, 2 * H2.T @ H2 / 64, bits=3, group_size=8, scale_dtype=X.dtype
    )
    assert torch.equal(q[2].weight, second.weight)
    info = q.hesse_quantization
    assert [layer.name for layer in info.layers] == ["0", "2", "4"]
    assert all(layer.error <= layer.rtn_error for layer in info.layers)
    unseq = gptq(net, [X], bits=3, group_size=8, sequential=False)
    assert not torch.equal(unseq[2].weight, q[2].weight)


def test_transformer_groups_are_blocks_then_rest_and_hessians_stop_early():
    model = _bert()
    layers = quantizable(model)
    owners = {n: o for n, (_, o) in _scan(model).items()}
    plan = groups(layers, owners)
    assert [b for b, _ in plan] == ["bert.encoder.layer.0", "bert.encoder.layer.1", ""]
    assert plan[-1][1] == ["bert.pooler.dense", "classifier"]
    modules = dict(model.named_modules())
    block0 = {n: modules[n] for n in plan[0][1]}
    Hs, rows = hessians(model, block0, _calib(), modules["bert.encoder.layer.0"])
    assert set(Hs) == set(plan[0][1]) and rows["bert.encoder.layer.0.attention.self.query"] == 96
    H = Hs["bert.encoder.layer.0.attention.self.query"]
    assert torch.allclose(H, H.T) and torch.linalg.eigvalsh(H).min() > -1e-10


def test_bert_widths_dict_groups_and_embeddings():
    model, calib = _bert(), _calib()
    bits = {"bert.encoder.layer.0.attention.self.query": 2, "classifier": 8}
    q = gptq(model, calib, bits=bits, group_size=8)
    info = q.hesse_quantization
    assert {(layer.name, layer.bits, layer.group_size) for layer in info.layers} == {
        ("bert.encoder.layer.0.attention.self.query", 2, 8),
        ("classifier", 8, 8),
    }
    key = q.bert.encoder.layer[1].attention.self.key
    assert torch.equal(key.weight, model.bert.encoder.layer[1].attention.self.key.weight)
    emb = q.bert.embeddings.word_embeddings.weight
    assert "bert.embeddings.word_embeddings.weight" in info.embeddings
    c = info.codes["bert.embeddings.word_embeddings.weight"]
    assert c.q.shape == emb.shape and torch.equal(c.q, c.q.round())
    top = c.q.abs().amax(1)
    assert ((top <= 127) & ((top > 63) | (top == 0))).all()  # 8 bits, steps powers of two
    assert torch.equal(c.scale, torch.exp2(torch.log2(c.scale).round()))
    assert torch.equal(c.dequantize().float(), emb)
    q16 = gptq(model, calib, bits=3, group_size=32, embeddings=None)
    word = model.bert.embeddings.word_embeddings.weight
    assert torch.equal(q16.bert.embeddings.word_embeddings.weight, word)  # embeddings=None
    assert {layer.group_size for layer in q16.hesse_quantization.layers} == {
        32,
        None,
    }  # 32 divides MLP-out only


def test_refusals():
    with pytest.raises(ValueError, match="unknown layer"):
        gptq(_net(), [torch.randn(4, 8).double()], bits={"nope": 4})
    with pytest.raises(ValueError, match="bits"):
        gptq(_net(), [torch.randn(4, 8).double()], bits=1)
    with pytest.raises(ValueError, match="no calibration inputs"):
        gptq(_net(), [], bits=4)


def test_plan_predicts_the_hessians_held():
    from hesse.quant import gptq_plan, quantization_of

    model, calib = _bert(), _calib()
    plan = gptq_plan(model)
    q = gptq(model, calib, bits=4, group_size=16, embeddings=None)
    assert plan.hessian_bytes == quantization_of(q).hessian_bytes
    assert plan.group == "bert.encoder.layer.0"  # q, k, v, attn out, MLP in: 16 inputs; out: 32
    assert plan.hessian_bytes == (5 * 16**2 + 32**2) * 8
    flat = gptq_plan(model, sequential=False)
    assert flat.hessian_bytes > plan.hessian_bytes and flat.total > plan.total
