"""Review fixes of hesse.quant, each against a reference.

Exact allocation (brute force, an exact knapsack over integer costs), output axes (GPT-2
Conv1D), tied weights, unreached layers, Hugging Face blocks, float64 errors (float64
arithmetic) and multiply-accumulates per sample (counts by hand).
"""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hesse import Objective, quant
from hesse.quant import Quantizer
from hesse.quant.reconstruct import _default_blocks
from hesse.quant.sensitivity import LayerSensitivity, Sensitivity

transformers = pytest.importorskip("transformers")

from hf_models import bert_classifier, classifier_batches, gpt2_lm, lm_batches  # noqa: E402

# ---------------------------------------------------------------------- allocate is exact


def synthetic(sizes, omegas, bits, macs=None):
    """A Sensitivity whose rows have the given sizes, MACs and Ω (scores do not enter)."""
    macs = sizes if macs is None else macs
    rows = tuple(
        LayerSensitivity(f"l{i}", f"l{i}.weight", int(n), int(m), 1.0, False,
                         dict.fromkeys(bits, 0.0), {b: float(w[b]) for b in bits})
        for i, (n, m, w) in enumerate(zip(sizes, macs, omegas, strict=True))
    )  # fmt: skip
    return Sensitivity("trace", tuple(bits), rows, Quantizer(), "hessian", 0)


def spread_omegas(rng, sizes, bits):
    """Ω of layers whose scores span 8 decades (1e-4 to 1e4)."""
    scores = 10.0 ** rng.uniform(-4, 4, len(sizes))
    return [{b: s * n * rng.uniform(0.5, 2) * 4.0 ** (-b) for b in bits}
            for s, n in zip(scores, sizes, strict=True)]  # fmt: skip


def brute_force(sizes, omegas, bits, budget_bits):
    """The least Σ Ω over every configuration whose Σ n_i b_i is within the budget (in bits)."""
    configs = np.array(list(itertools.product(range(len(bits)), repeat=len(sizes))))
    widths = np.array(bits)[configs]
    cost = (widths * np.array(sizes)).sum(1)
    table = np.array([[w[b] for b in bits] for w in omegas])
    omega = table[np.arange(len(sizes)), configs].sum(1)
    return omega[cost <= budget_bits].min()


def knapsack(costs, omegas, bits, capacity):
    """``best[c]``: the least Σ Ω with Σ cost <= c, for every integer c up to ``capacity``."""
    best = np.zeros(capacity + 1)
    for c_i, w in zip(costs, omegas, strict=True):
        new = np.full(capacity + 1, np.inf)
        for b in bits:
            c = c_i * b
            if c <= capacity:
                new[c:] = np.minimum(new[c:], best[: capacity + 1 - c] + w[b])
        best = new
    return best


def spent_bits(sens, bits):
    return sum(r.n_params * bits[r.name] for r in sens.layers)


def test_allocate_equals_brute_force_with_scores_over_8_decades():
    for seed in range(150):
        rng = np.random.default_rng(seed)
        bits = (2, 3, 4, 8) if seed % 2 else (2, 3, 4)
        sizes = rng.integers(4, 200, 6)
        omegas = spread_omegas(rng, sizes, bits)
        sens = synthetic(sizes, omegas, bits)
        budget_bits = int(rng.integers(2 * sizes.sum(), max(bits) * sizes.sum()))
        alloc = quant.allocate(sens, budget_bits / 8, frontier=0)
        best = brute_force(sizes, omegas, bits, budget_bits)
        assert alloc.predicted == pytest.approx(best, rel=1e-12, abs=0), seed
        assert spent_bits(sens, alloc.bits) <= budget_bits


@pytest.mark.parametrize("cost", ["size", "bops"])
def test_allocate_equals_an_exact_knapsack_on_30_layers(cost):
    bits = (2, 3, 4, 8)
    for seed in range(2):
        rng = np.random.default_rng(100 + seed)
        sizes = rng.integers(4, 60, 30)
        macs = sizes * rng.integers(1, 4, 30)
        sens = synthetic(sizes, spread_omegas(rng, sizes, bits), bits, macs)
        per_bit = sizes if cost == "size" else macs * 8  # bits, or bit-operations at a = 8
        omegas = [r.omega for r in sens.layers]
        top = int(per_bit.sum()) * 8
        best = knapsack(per_bit, omegas, bits, top)
        for capacity in np.linspace(2 * per_bit.sum(), top, 35).astype(int):
            budget = capacity / 8 if cost == "size" else capacity
            alloc = quant.allocate(sens, budget, cost=cost, frontier=0)
            assert alloc.predicted == pytest.approx(best[capacity], rel=1e-12, abs=0)
            spent = alloc.size_bytes * 8 if cost == "size" else alloc.bops
            assert spent <= capacity


def test_allocate_frontier_points_are_each_optimal_at_their_cost():
    rng = np.random.default_rng(7)
    bits = (2, 3, 4, 8)
    sizes = rng.integers(4, 60, 30)
    sens = synthetic(sizes, spread_omegas(rng, sizes, bits), bits)
    best = knapsack(sizes, [r.omega for r in sens.layers], bits, int(sizes.sum()) * 8)
    alloc = quant.allocate(sens, sizes.sum(), frontier=24)
    assert len(alloc.frontier) > 10
    for p in alloc.frontier:
        assert p.predicted == pytest.approx(best[int(p.cost * 8)], rel=1e-12, abs=0)


@pytest.mark.parametrize("below", [1, 2, 3, 5])
def test_allocate_never_exceeds_a_budget_just_below_uniform_4_bit(below):
    sizes = [1024 * 1024] * 96 + [1024 * 4096] * 48 + [34816 * 1024]  # BERT-large-like
    assert sum(sizes) == 337_641_472
    bits = (2, 3, 4, 8)
    rng = np.random.default_rng(0)
    omegas = [{b: 10.0 ** rng.uniform(-2, 2) * n * 4.0 ** (-b) for b in bits} for n in sizes]
    sens = synthetic(sizes, omegas, bits)
    budget = sum(sizes) * 4 // 8 - below  # bytes: `below` bytes under uniform 4-bit
    alloc = quant.allocate(sens, budget, frontier=0)
    assert spent_bits(sens, alloc.bits) <= 8 * budget  # exact integers
    assert alloc.size_bytes <= budget


# ---------------------------------------------------------------------- output axes


def conv1d_layers(model):
    return {n: p for n, p in quant.quantizable(model).items() if n.startswith("transformer.h.")}


def test_gpt2_conv1d_layers_are_named_by_module_and_grids_run_along_columns():
    model = gpt2_lm()
    layers = conv1d_layers(model)
    assert layers["transformer.h.0.attn.c_attn"] == "transformer.h.0.attn.c_attn.weight"
    q = quant.quantize(model, dict.fromkeys(layers, 2), Quantizer(2, "channel"))
    weights, before = dict(q.named_parameters()), dict(model.named_parameters())
    for p in layers.values():
        W, Q = before[p].detach(), weights[p].detach()  # (in, out): a column per output
        assert all(len(column.unique()) <= 3 for column in Q.T)  # levels -s, 0, s
        assert torch.allclose(Q.abs().amax(0), W.abs().amax(0))  # each column's max is exact


def test_gpt2_groups_run_along_the_reduction_dimension():
    model, g = gpt2_lm(), 8
    layers = conv1d_layers(model)
    q = quant.quantize(model, dict.fromkeys(layers, 2), Quantizer(2, "group", group_size=g))
    weights, before = dict(q.named_parameters()), dict(model.named_parameters())
    for p in layers.values():
        W, Q = before[p].detach(), weights[p].detach()
        n_in, n_out = W.shape
        chunks = Q.T.reshape(n_out, n_in // g, g)  # g consecutive inputs of one output
        assert all(len(chunk.unique()) <= 3 for chunk in chunks.reshape(-1, g))
        top = W.T.reshape(n_out, n_in // g, g).abs().amax(-1)
        assert torch.allclose(chunks.abs().amax(-1), top)


def test_every_path_quantizes_conv1d_along_its_output_axis():
    model, data = gpt2_lm(), lm_batches()
    obj = Objective(model, data)
    layers = conv1d_layers(model)
    q = Quantizer(2, "channel")
    sens = quant.sensitivity(obj, (2,), quantizer=q, budget=2)
    direct = dict(quant.quantize(model, dict.fromkeys(layers, 2), q).named_parameters())
    weights = dict(model.named_parameters())
    T = data[0]["input_ids"].shape[1]
    for name, p in layers.items():
        assert sens[name].delta_sq[2] == pytest.approx(
            float(((direct[p] - weights[p]).detach().double() ** 2).sum()), rel=1e-12
        )
        assert sens[name].macs == weights[p].numel() * T
    switch = quant.BitSwitch(model, (8, 2), quantizer=Quantizer(8, "channel"))
    fitted = dict(quant.reconstruct(obj, dict.fromkeys(layers, 2), quantizer=q,
                                    steps=2).named_parameters())  # fmt: skip
    for name, p in layers.items():
        assert all(len(column.unique()) <= 3 for column in switch.weight(name, 2).T)
        assert all(len(column.unique()) <= 3 for column in fitted[p].detach().T)


# ---------------------------------------------------------------------- tied weights


def masked_lm():
    from transformers import BertForMaskedLM

    return bert_classifier(cls=BertForMaskedLM)


def test_a_tied_weight_is_one_layer_for_quantizable_quantize_switch_and_sensitivity():
    model = masked_lm()
    layers = quant.quantizable(model)
    embedding = "bert.embeddings.word_embeddings.weight"
    assert layers["cls.predictions.decoder"] == embedding
    assert list(layers.values()).count(embedding) == 1
    q = quant.quantize(model, {"cls.predictions.decoder": 2})
    assert q.cls.predictions.decoder.weight is q.bert.embeddings.word_embeddings.weight
    W = q.cls.predictions.decoder.weight.detach()
    assert all(len(row.unique()) <= 3 for row in W)
    switch = quant.BitSwitch(model, (8, 4))
    assert list(switch.layers) == list(layers)
    assert torch.equal(switch.model(4).cls.predictions.decoder.weight,
                       switch.weight("cls.predictions.decoder", 4))  # fmt: skip
    obj = Objective(model, lm_batches(vocab=60))
    sens = quant.sensitivity(obj, (4,), budget=2)
    assert sens.names == list(layers)
    T = lm_batches(vocab=60)[0]["input_ids"].shape[1]
    assert sens["cls.predictions.decoder"].macs == W.numel() * T  # the decoder's products


# ---------------------------------------------------------------------- unreached layers


@pytest.mark.parametrize("method", ["trace", "eig", "qbert"])
def test_a_layer_the_loss_does_not_reach_scores_zero(method):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    x = torch.randn(2, 8, 3, dtype=torch.float64)
    data = [(x[i], torch.randint(2, (8,))) for i in range(2)]
    obj = Objective(Net().double().eval(), data, F.cross_entropy)
    sens = quant.sensitivity(obj, (4,), method=method, budget=30)
    assert sens["unused"].score == 0.0 and sens["unused"].omega == {4: 0.0}
    assert sens["used"].score > 0


# ---------------------------------------------------------------------- Hugging Face blocks


def test_reconstruct_takes_transformer_layers_as_blocks_on_a_hugging_face_model():
    model = bert_classifier()
    assert _default_blocks(model) == ["bert.embeddings", "bert.encoder.layer.0",
                                      "bert.encoder.layer.1", "bert.pooler.dense",
                                      "classifier"]  # fmt: skip
    obj = Objective(model, classifier_batches())
    bits = dict.fromkeys(quant.quantizable(model), 3)
    q = Quantizer(3)
    out = quant.reconstruct(obj, bits, quantizer=q, weighting="mse", steps=5, lr=0.05)
    before, after = dict(model.named_parameters()), dict(out.named_parameters())
    for p in quant.quantizable(model).values():
        grid = q.codes(before[p].detach(), 3)
        assert torch.equal(grid.project(after[p].detach()), after[p].detach())


# ---------------------------------------------------------------------- float64 errors


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_errors_of_half_precision_weights_are_taken_in_float64(bits, dtype):
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(bits)).to(dtype)
    q = Quantizer(bits)
    stored = q.fake(W, bits)  # what quantize() writes into the model
    exact = float(((stored.double() - W.double()) ** 2).sum())
    assert q.error(W, bits) == pytest.approx(exact, rel=1e-12)
    model = nn.Sequential(nn.Linear(32, 16, bias=False)).to(dtype)
    with torch.no_grad():
        model[0].weight.copy_(W)
    switch = quant.BitSwitch(model, (8, 4, 2), quantizer=Quantizer(8))
    for b in (8, 4, 2):
        held = switch.model(b)[0].weight.detach()
        assert switch.delta_sq["0"][b] == pytest.approx(
            float(((held.double() - W.double()) ** 2).sum()), rel=1e-12
        )


# ---------------------------------------------------------------------- MACs per sample

E, HEADS, FF, T, B, C = 8, 2, 16, 10, 3, 4


class Encoder(nn.Module):
    """A TransformerEncoderLayer on (B, T, E) inputs, held batch-first or sequence-first."""

    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.enc = nn.TransformerEncoderLayer(E, HEADS, FF, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(E, C)

    def forward(self, x):
        h = self.enc(x if self.batch_first else x.transpose(0, 1))
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(1))


@pytest.mark.parametrize("batch_first", [False, True])
def test_macs_per_sample_of_a_transformer_encoder_layer_match_a_hand_count(batch_first):
    torch.manual_seed(0)
    model = Encoder(batch_first).double().eval()
    x = torch.randn(B, T, E, dtype=torch.float64)
    obj = Objective(model, (x, torch.randint(C, (B,))), F.cross_entropy)
    macs = {r.name: r.macs for r in quant.sensitivity(obj, (4,), budget=2).layers}
    assert macs == {
        "enc.self_attn.in_proj_weight": T * 3 * E * E,  # q, k, v of every token
        "enc.self_attn.out_proj": T * E * E,  # applied by F.linear inside attention
        "enc.linear1": T * E * FF,
        "enc.linear2": T * FF * E,
        "head": E * C,  # once per sample
    }
    assert sum(macs.values()) == 5120 + 32


def test_row_groups_share_one_grid_per_group_of_output_units():
    # Q-BERT's group-wise quantization: group_size consecutive output units share a grid
    W = torch.randn(3, 8, dtype=torch.float64)  # HF Conv1D layout: 8 output units
    q = Quantizer(2, "rows", 4)
    Q = q.fake(W, axis=1)
    for g in range(2):
        block = Q[:, 4 * g : 4 * g + 4]
        assert block.unique().numel() <= 3  # one symmetric 2-bit grid: -s, 0, s
        assert torch.isclose(block.abs().max(), W[:, 4 * g : 4 * g + 4].abs().max())
    with pytest.raises(ValueError, match="does not divide the 8 output units"):
        Quantizer(2, "rows", 3).fake(W, axis=1)
