"""SparseGPT: the paper's sweep, and its calibration block by block.

The sweep equals a float64 transcription of the paper's algorithm; the sequential calibration
equals pruning block by block with full passes of the model.
"""

import copy

import pytest
import torch
from sparsegpt_reference import sparsegpt_reference
from torch import nn

from hesse import Objective
from hesse.prune import layer_hessian, obs_layer, prune

transformers = pytest.importorskip("transformers")

DT = torch.float64


def _layer(seed, rows=12, cols=320, n=600, dead=True):
    """A layer with correlated inputs (rank 8 plus noise) and, optionally, one dead input."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(cols, 8, generator=gen, dtype=DT)
    X = A @ torch.randn(8, n, generator=gen, dtype=DT) + 0.3 * torch.randn(
        cols, n, generator=gen, dtype=DT
    )
    if dead:
        X[5] = 0.0
    return torch.randn(rows, cols, generator=gen, dtype=DT), 2 * X @ X.T / n


def _error(W, W_hat, H):
    D = W - W_hat
    return float(torch.einsum("ri,ij,rj->", D, H, D))


CASES = [(0.5, None), (0.7, None), (None, "2:4"), (None, "4:8")]


@pytest.mark.parametrize(("sparsity", "pattern"), CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_sweep_equals_the_papers_algorithm(seed, sparsity, pattern):
    W, H = _layer(seed)
    nm = tuple(int(v) for v in pattern.split(":")) if pattern else None
    want = sparsegpt_reference(W, H, sparsity, nm, block=128)  # 320 columns: a last block of 64
    r = obs_layer(W, H, sparsity=sparsity, pattern=pattern, block=128, fallback=False)
    assert r.rule == "obs"
    torch.testing.assert_close(r.weight, want, rtol=0, atol=1e-10)
    assert torch.equal(r.mask, want != 0)
    # the fallback never does worse on the layer objective than the paper's sweep
    best = obs_layer(W, H, sparsity=sparsity, pattern=pattern, block=128)
    assert best.error <= _error(W, want, H) * (1 + 1e-12)


def test_sweep_on_a_conv1d_layout_is_the_transposed_sweep():
    W, H = _layer(3, dead=False)
    want = sparsegpt_reference(W, H, None, (2, 4), block=128)
    r = obs_layer(W.T.contiguous(), H, sparsity=None, pattern="2:4", axis=1, fallback=False)
    torch.testing.assert_close(r.weight, want.T, rtol=0, atol=1e-10)


# ------------------------------------------------ sequential calibration


def _gpt2(layers=3):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=40, n_positions=16, n_embd=16, n_layer=layers, n_head=2
    )
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (6, 12), generator=gen)
    return model, [{"input_ids": ids[i : i + 3], "labels": ids[i : i + 3]} for i in (0, 3)]


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=2,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(cfg).double().eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (6, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # padding: the attention mask travels with the stored block inputs
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    return model, [
        {
            "input_ids": ids[i : i + 3],
            "attention_mask": mask[i : i + 3],
            "labels": labels[i : i + 3],
        }
        for i in (0, 3)
    ]


def _reference(model, data, names, prefixes, **kw):
    """Block by block with full passes: each block's Hessians from the model so far pruned."""
    work = copy.deepcopy(model)
    params = dict(work.named_parameters())
    order = [[n for n in names if n.startswith(p)] for p in prefixes]
    order.append([n for n in names if not any(n.startswith(p) for p in prefixes)])
    out = {}
    for group in order:
        Hs = {n: layer_hessian(work, params[n], data) for n in group}
        for n in group:
            axis = (
                1
                if isinstance(
                    work.get_submodule(n.rpartition(".")[0]), transformers.pytorch_utils.Conv1D
                )
                else 0
            )
            r = obs_layer(params[n].detach(), Hs[n], axis=axis, **kw)
            out[n] = r.weight
        with torch.no_grad():
            for n in group:
                params[n].copy_(out[n])
    return out


@pytest.mark.parametrize(
    ("make", "blocks"), [(_gpt2, "transformer.h"), (_bert, "bert.encoder.layer")]
)
@pytest.mark.parametrize(("sparsity", "structure"), [(0.5, "unstructured"), (None, "2:4")])
def test_sequential_equals_block_by_block_full_passes(make, blocks, sparsity, structure):
    model, data = make()
    plan = prune(Objective(model, data), sparsity, "sparsegpt", structure=structure)
    layers = len(model.get_submodule(blocks))
    prefixes = [f"{blocks}.{i}." for i in range(layers)]
    kw = (
        {"sparsity": sparsity, "pattern": None}
        if structure == "unstructured"
        else {"sparsity": None, "pattern": structure}
    )
    want = _reference(model, data, list(plan.weights), prefixes, **kw)
    assert set(want) == set(plan.weights)
    for name, w in want.items():
        torch.testing.assert_close(plan.weights[name], w, rtol=0, atol=1e-9, msg=name)
    c = plan.calibration
    assert c is not None and c.sequential
    outside = any(not n.startswith(blocks) for n in plan.weights)
    assert c.pieces == layers + outside
    hidden = sum(b["input_ids"].numel() for b in data) * 16 * 8  # one stored float64 state
    assert c.peak_bytes >= 2 * hidden  # a block's inputs and outputs, at least
    assert c.planned_bytes == c.peak_bytes  # the plan, made before any Hessian, is exact
    assert plan.removed_params == sum(int((~m).sum()) for m in plan.masks.values())


def test_sequential_differs_from_one_pass_and_one_pass_is_layer_obs():
    model, data = _gpt2()
    obj = Objective(model, data)
    seq = prune(obj, 0.5, "sparsegpt")
    flat = prune(obj, 0.5, "sparsegpt", sequential=False)
    layer_obs = prune(obj, 0.5, "layer_obs")
    for name in flat.weights:
        torch.testing.assert_close(flat.weights[name], layer_obs.weights[name], rtol=0, atol=0)
    last = "transformer.h.2.mlp.c_proj.weight"
    assert not torch.allclose(seq.weights[last], flat.weights[last])
    first = "transformer.h.0.attn.c_attn.weight"  # the first block sees the same inputs
    torch.testing.assert_close(seq.weights[first], flat.weights[first], rtol=0, atol=1e-12)
    assert flat.calibration is not None and not flat.calibration.sequential


def test_peak_holds_one_block_not_all():
    model, data = _gpt2(layers=4)
    obj = Objective(model, data)
    seq = prune(obj, 0.5, "sparsegpt").calibration
    flat = prune(obj, 0.5, "sparsegpt", sequential=False).calibration
    # float64 Hessians: c_attn, attn.c_proj, c_fc read 16 inputs, mlp.c_proj 64
    block = (3 * 16 * 16 + 64 * 64) * 8
    assert flat.peak_bytes == flat.planned_bytes == 4 * block
    hidden = 6 * 12 * 16 * 8  # the stored states of one block: 6 sequences of 12 tokens
    assert 2 * hidden + block <= seq.peak_bytes < 2 * hidden + block + hidden


def test_errors_name_the_fix():
    model, data = _gpt2(layers=1)
    obj = Objective(model, data)
    with pytest.raises(ValueError, match="one-shot"):
        prune(obj, 0.5, "sparsegpt", recompute=2)

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.spare = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)])
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x)

    net = Unused().double()
    x = torch.randn(8, 4, dtype=DT)
    unused = Objective(net, [(x, torch.randint(0, 2, (8,)))], loss=nn.functional.cross_entropy)
    with pytest.raises(ValueError, match="sequential=False"):
        prune(unused, 0.5, "sparsegpt", params=["fc.weight", "spare.0.weight"])


def test_a_model_without_blocks_is_one_piece_equal_to_layer_obs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    x = torch.randn(32, 8, dtype=DT)
    obj = Objective(net, [(x, torch.randint(0, 4, (32,)))], loss=nn.functional.cross_entropy)
    plan = prune(obj, None, "sparsegpt", structure="2:4")
    want = prune(obj, None, "layer_obs", structure="2:4")
    assert plan.calibration is not None and not plan.calibration.sequential
    assert plan.calibration.pieces == 1
    for name, w in want.weights.items():
        torch.testing.assert_close(plan.weights[name], w, rtol=0, atol=0)
