"""Pruning review: n:m groups along the reduction axis, SparseGPT's n:m rule, sparsity 0.

And weights the loss never reaches: pruned first, by every saliency method.
"""

import pytest
import torch
import torch.nn.functional as F
from prune_cases import trained_mlp
from sparsegpt_reference import sparsegpt_reference
from torch import nn

from hesse import Objective
from hesse.prune import collect_gradients, layer_hessian, obs_layer, prune, saliency
from hesse.prune.saliency import curvature_for

DT = torch.float64

# ------------------------------------------------ n:m groups along the reduction dimension


def _small_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, 4, 4, generator=gen, dtype=DT)
    data = [(x, torch.randint(0, 3, (12,), generator=gen))]
    model = model.double().eval()
    return model, Objective(model, data, loss=F.cross_entropy)


def _small_gpt2():
    pytest.importorskip("transformers")
    from hf_models import gpt2_lm, lm_batches

    model = gpt2_lm(layers=1, embd=16, heads=2, vocab=20, positions=16)
    data = lm_batches(sizes=(2, 2), lengths=(5, 6), vocab=20)
    return model, Objective(model, data)


def _reduction_rows(model, name, mask):
    """``mask`` as (output unit, reduction) rows, written out per module type."""
    owner = model.get_submodule(name.rpartition(".")[0])
    if type(owner).__name__ == "Conv1D":  # Hugging Face: weight stored (in, out)
        return mask.T
    return mask.reshape(mask.shape[0], -1)  # Linear (out, in), Conv2d (out, C, k, k)


_MODELS = {"linear": lambda: trained_mlp()[::2], "conv2d": _small_cnn, "hf_conv1d": _small_gpt2}


@pytest.mark.parametrize("method", ["magnitude", "obd", "mfac", "layer_obs"])
@pytest.mark.parametrize("kind", list(_MODELS))
def test_two_of_four_groups_run_along_the_reduction_dimension(kind, method):
    model, obj = _MODELS[kind]()
    plan = prune(obj, None, method, structure="2:4", m=None)
    assert plan.skipped == () and plan.masks
    weights = dict(plan.apply(model).named_parameters())
    for name, mask in plan.masks.items():
        groups = _reduction_rows(model, name, mask).reshape(-1, 4).sum(-1)
        share = float((groups == 2).double().mean())
        assert share == 1.0, f"{name}: {share:.1%} of the groups keep 2"
        assert (weights[name][~mask] == 0).all()


def test_hf_conv1d_input_hessian_and_sweep_match_the_linear_layer():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    linear = nn.Linear(8, 6).double()
    conv1d = Conv1D(6, 8).double()  # weight (in, out) = (8, 6)
    with torch.no_grad():
        conv1d.weight.copy_(linear.weight.T)
    x = torch.randn(3, 5, 8, dtype=DT)
    H = layer_hessian(conv1d, conv1d, [(x, None)])
    X = x.reshape(-1, 8)
    torch.testing.assert_close(H, 2 * X.T @ X / 15, rtol=1e-12, atol=0)
    rows = obs_layer(linear.weight, H, sparsity=None, pattern="2:4")
    cols = obs_layer(conv1d.weight, H, sparsity=None, pattern="2:4", axis=1)
    assert torch.equal(cols.weight, rows.weight.T) and torch.equal(cols.mask, rows.mask.T)


# ------------------------------------------------ n:m with the sweep: SparseGPT's own rule


def _correlated_layer(seed, rows=16, cols=256, n=512):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(cols, 8, generator=gen, dtype=DT)
    X = A @ torch.randn(8, n, generator=gen, dtype=DT) + 0.3 * torch.randn(
        cols, n, generator=gen, dtype=DT
    )
    W = torch.randn(rows, cols, generator=gen, dtype=DT)
    return W, 2 * X @ X.T / n


def _error(W, W_hat, H):
    D = W - W_hat
    return float(torch.einsum("ri,ij,rj->", D, H, D))


@pytest.mark.parametrize("pattern", ["2:4", "1:4"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nm_sweep_matches_sparsegpt_at_block_128(seed, pattern):
    W, H = _correlated_layer(seed)
    keep = int(pattern[0])
    reference = _error(W, sparsegpt_reference(W, H, None, (keep, 4), block=128), H)
    r = obs_layer(W, H, sparsity=None, pattern=pattern, block=128)
    assert r.error <= reference * (1 + 1e-6), (r.error / reference, r.rule)
    assert (r.mask.reshape(16, -1, 4).sum(-1) == keep).all()


# ------------------------------------------------ sparsity 0


def _dead_inputs_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 3)).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=gen)
    x[:, [2, 5]] = 0.0  # two inputs never seen in the calibration data
    return model, [(x, torch.randint(0, 3, (40,), generator=gen))]


def test_obs_layer_at_sparsity_zero_returns_the_weights_unchanged():
    W, H = _correlated_layer(0, cols=16, n=64)
    H[3, :] = H[:, 3] = 0.0  # a dead input
    r = obs_layer(W, H, sparsity=0.0)
    assert torch.equal(r.weight, W) and r.mask.all() and r.error == 0.0


def test_layer_obs_at_sparsity_zero_removes_nothing_even_with_dead_inputs():
    model, data = _dead_inputs_mlp()
    plan = prune(Objective(model, data, loss=F.cross_entropy), 0.0, "layer_obs")
    assert plan.removed_params == 0 and all(m.all() for m in plan.masks.values())
    pruned = plan.apply(model)
    for (name, a), b in zip(pruned.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# ------------------------------------------------ weights the loss never reaches


class _UnusedHead(nn.Module):
    """A trunk and a head the loss reads, and a second head it never reaches."""

    def __init__(self):
        super().__init__()
        self.trunk, self.head, self.unused = nn.Linear(8, 16), nn.Linear(16, 3), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.trunk(x)))


def _unused_head():
    torch.manual_seed(0)
    model = _UnusedHead().double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=gen, dtype=DT)
    y = (x[:, :2].sum(1) > 0).long() + (x[:, 2] > 0.5).long()
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), Objective(model.eval(), [(x, y)], loss=F.cross_entropy)


@pytest.mark.parametrize(
    "method,curvature,fisher_block",
    [
        ("mfac", "fisher", 16),
        ("mfac", "fisher", 128),
        ("mfac", "fisher", None),
        ("obd", "fisher", None),
        ("obs", "fisher", None),
        ("obd", "ggn", None),
        ("obs", "hessian", None),
    ],
)
def test_weights_the_loss_never_reaches_are_pruned_first(method, curvature, fisher_block):
    model, obj = _unused_head()  # 240 weights, 64 of them in the unused head
    kw = {"curvature": curvature, "fisher_block": fisher_block, "m": None}
    plan = prune(obj, 0.3, method, **kw)
    share = 1 - float(plan.masks["unused.weight"].double().mean())
    assert share == 1.0, f"{share:.1%} of the unreached head pruned"
    assert plan.removed_params == 72
    s = saliency(obj, method, **kw)
    assert (s.scores["unused.weight"] == 0).all()
    assert (s.scores["trunk.weight"] > 0).all() and (s.scores["head.weight"] > 0).all()


def test_fisher_blocks_the_loss_never_reaches_are_damped_relative_to_the_whole_fisher():
    _, obj = _unused_head()
    H = curvature_for(obj, "mfac", "fisher", 0.01, None, 1, None, 0, fisher_block=16)
    C_diag = (collect_gradients(obj, m=None) ** 2).mean(0)
    unreached = 0
    for part, block in H.woodbury:
        own = float(C_diag[part].mean())
        unreached += own == 0
        want = 0.01 * (own if own > 0 else float(C_diag.mean()))
        assert block.damping == pytest.approx(want, rel=1e-12)
    assert unreached >= 3
