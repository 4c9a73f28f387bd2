"""quant.save: packed compressed-tensors checkpoints that from_pretrained reloads."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from safetensors import safe_open

from hesse.quant import gptq, save
from hesse.quant._pack import pack_int32
from hf_models import bert_classifier


def _bert():
    return bert_classifier(
        torch.float32, "eager", hidden=64, layers=1, intermediate=128, vocab=40,
        max_positions=16, num_labels=3, init_range=0.02,
    )  # fmt: skip


def _calib():
    ids = torch.randint(0, 40, (6, 12), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_equals_compressed_tensors(bits):
    g = torch.Generator().manual_seed(bits)
    v = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (5, 77), generator=g, dtype=torch.int8)
    for dim in (0, 1):
        assert torch.equal(pack_int32(v, bits, dim), pack_to_int32(v, bits, dim))


def test_mixed_widths_reload_with_the_same_outputs_and_size(tmp_path):
    model, calib = _bert(), _calib()
    bits = {"bert.encoder.layer.0.attention.self.query": 3, "bert.encoder.layer.0.output.dense": 8}
    bits |= {n: 4 for n in ("bert.encoder.layer.0.attention.self.key", "classifier")}
    q = gptq(model, calib, bits=bits, group_size=32, embeddings=None)
    saved = save(q, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    schemes = {(g["weights"]["num_bits"], g["weights"]["group_size"]) for g in
               config["config_groups"].values()}  # fmt: skip
    assert schemes == {(3, 32), (8, 32), (4, 32)}
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "q").eval()
    with torch.no_grad():
        want, got = q(**calib[0]).logits, back(**calib[0]).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    params = dict(q.named_parameters())
    ideal = sum(params[n + ".weight"].numel() * b / 8 for n, b in bits.items())
    ideal += sum(params[n + ".weight"].numel() / 32 * 4 for n in bits)  # float32 scales
    assert abs(saved.packed_bytes - ideal) <= 0.1 * ideal
    quantized = {n + ".weight" for n in bits}
    floats = sum(p.numel() * 4 for n, p in params.items() if n not in quantized)
    assert saved.float_bytes == floats
    assert saved.weight_bytes >= saved.packed_bytes + saved.float_bytes
    assert saved.weight_bytes <= saved.packed_bytes + saved.float_bytes + 8192  # header
    assert saved.folder_bytes == sum(f.stat().st_size for f in (tmp_path / "q").rglob("*"))


def test_embeddings_written_dense_and_reload(tmp_path):
    model, calib = _bert(), _calib()
    q = gptq(model, calib, bits=4, group_size=32, embeddings=8)
    saved = save(q, tmp_path / "q")
    assert "bert.embeddings.word_embeddings.weight" in saved.dense
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:  # exact in bfloat16
        assert f.get_slice("bert.embeddings.word_embeddings.weight").get_dtype() == "BF16"
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "q").eval()
    assert torch.equal(back.bert.embeddings.word_embeddings.weight,
                       q.bert.embeddings.word_embeddings.weight)  # fmt: skip
    again = save(q, tmp_path / "q")  # replaces the folder
    assert again.folder_bytes == saved.folder_bytes


def test_refusals(tmp_path):
    model, calib = _bert(), _calib()
    with pytest.raises(TypeError, match="hesse.quant.gptq"):
        save(model, tmp_path / "plain")
    q = gptq(model, calib, bits=4, group_size=32, symmetric=False, embeddings=None)
    with pytest.raises(ValueError, match="symmetric=True"):
        save(q, tmp_path / "asym")
    assert not (tmp_path / "asym").exists()


def test_full_range_codes_reload(tmp_path):
    model, calib = _bert(), _calib()
    q = gptq(model, calib, bits=4, group_size=32, embeddings=None, full_range=True)
    save(q, tmp_path / "q")
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "q").eval()
    with torch.no_grad():
        want, got = q(**calib[0]).logits, back(**calib[0]).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert min(int(c.q.min()) for c in q.hesse_quantization.codes.values()) == -8
