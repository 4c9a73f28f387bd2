"""The calibration memory model shared by GPTQ and SparseGPT, and hesse.plan(compress=...)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hesse
from hesse import quant
from hesse.problem.calibration import (
    ACTIVATION_COPIES,
    RECORD_SQUARES,
    SWEEP_RECTS,
    SWEEP_SQUARES,
    calibration_memory,
)
from hf_models import bert_classifier


def _bert():
    return bert_classifier(
        torch.float32, "eager", hidden=16, layers=2, intermediate=32, vocab=30,
        max_positions=16, num_labels=2, init_range=0.02,
    )  # fmt: skip


def _calib(n=3):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 30, (4, 12), generator=g)
        out.append(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 2}
        )
    return out


def test_items_add_up_to_the_formula():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    layers = [("0", 16, 8), ("2", 4, 16)]
    m = calibration_memory(net, layers, method="gptq", activations=1000, stored=64, group_size=8)
    model = sum(p.numel() * 4 for p in net.parameters())
    assert m.model_bytes == m.copy_bytes == model
    assert m.results_bytes == 8 * (16 * 8 + 4 * 16) + 16 * (16 * 1 + 4 * 2)  # codes, scales
    assert m.hessian_bytes == 8 * 16 * 16 and m.group == "2"
    assert m.record_bytes == 1000 + int(RECORD_SQUARES * 8 * 16 * 16)
    assert m.sweep_bytes == 8 * (SWEEP_SQUARES * 16 * 16 + SWEEP_RECTS * 4 * 16)
    want = 2 * model + m.results_bytes + 64 + m.hessian_bytes + max(m.record_bytes, m.sweep_bytes)
    assert m.total == want and m.extra_bytes == want - model
    s = calibration_memory(net, layers, method="sparsegpt")
    assert s.copy_bytes == 0 and s.results_bytes == 5 * (16 * 8 + 4 * 16)  # weights + masks
    with pytest.raises(ValueError, match="method"):
        calibration_memory(net, layers, method="awq")


def test_plan_compress_gptq_agrees_with_gptq_plan_and_the_run():
    model, calib = _bert(), _calib()
    obj = hesse.Objective(model, calib)
    p = hesse.plan(obj, compress="gptq")
    q = quant.gptq_plan(model, [{k: v for k, v in b.items() if k != "labels"} for b in calib])
    assert (p.hessian_bytes, p.group, p.sweep_bytes) == (q.hessian_bytes, q.group, q.sweep_bytes)
    assert p.hessian_bytes == (5 * 16**2 + 32**2) * 8 and p.group == "bert.encoder.layer.0"
    hidden = 3 * 4 * 12 * 16 * 4  # 3 batches of 4 x 12 tokens, width 16, float32
    mask = 3 * 4 * 12 * 4 * 2  # the attention mask (4, 1, 1, 12) per batch, stored as float32
    assert (
        p.stored_bytes == q.stored_bytes and 2 * hidden <= p.stored_bytes <= 2 * hidden + 4 * mask
    )
    assert p.activation_bytes >= ACTIVATION_COPIES * 4 * 12 * 32 * 4  # the MLP's 32 units
    run = quant.gptq(model, [{k: v for k, v in b.items() if k != "labels"} for b in calib],
                     bits=4, group_size=16, embeddings=None)  # fmt: skip
    assert quant.quantization_of(run).hessian_bytes == p.hessian_bytes
    assert "gptq peak" in str(p) and p.total > p.model_bytes


def test_plan_compress_sparsegpt_groups_by_the_chain_and_one_pass_holds_all():
    model, calib = _bert(), _calib()
    names = [n for n, _ in model.named_parameters() if ".layer." in n and n.endswith("weight")]
    names = [n for n in names if "LayerNorm" not in n]
    obj = hesse.Objective(model, calib, params=names)
    seq = hesse.plan(obj, compress="sparsegpt")
    flat = hesse.plan(obj, compress="sparsegpt", sequential=False)
    assert seq.group == "bert.encoder.layer.0." and seq.copy_bytes == 0
    assert flat.hessian_bytes == 2 * seq.hessian_bytes and flat.stored_bytes == 0
    pruned = hesse.prune.prune(obj, 0.5, "sparsegpt", params=names).calibration
    assert pruned is not None  # its calibration state: stored states and one block's Hessians
    assert pruned.peak_bytes <= seq.stored_bytes + seq.hessian_bytes + seq.stored_bytes // 2
    with pytest.raises(ValueError, match="no Linear/Conv weight"):
        hesse.plan(hesse.Objective(model, calib, params=["bert.embeddings.word_embeddings.weight"]),
                   compress="gptq")  # fmt: skip


def test_a_model_without_blocks_plans_one_group_per_layer_and_full_passes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    obj = hesse.Objective(net, [(x, y)], loss=nn.functional.cross_entropy)
    p = hesse.plan(obj, compress="gptq")
    assert p.group == "2" and p.hessian_bytes == 8 * 32 * 32 and p.stored_bytes == 0
    assert p.activation_bytes == ACTIVATION_COPIES * 16 * 32 * 4  # the widest output, a full pass
    assert p.total == quant.gptq_plan(net, [x]).total
    with pytest.raises(ValueError, match="method must be one of"):
        hesse.plan(obj, compress="awq")
