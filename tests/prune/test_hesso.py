"""HESSO: the base optimizer without pruning, exact zeros, the target met, removal = zeroing."""

import pytest
import torch
import torch.nn.functional as F
from prune_cases import tiny_bert, tiny_transformer, zero_units
from torch import nn

from hesse.prune import CRIC, HESSO, hesso_groups

BASES = [
    ("sgd", dict(momentum=0.9, weight_decay=0.01), torch.optim.SGD, dict(momentum=0.9)),
    ("adam", dict(betas=(0.8, 0.99), weight_decay=0.01), torch.optim.Adam, dict(betas=(0.8, 0.99))),
    ("adamw", dict(weight_decay=0.1), torch.optim.AdamW, {}),
]


def _mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)
    ).double()
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 6, generator=gen, dtype=torch.float64)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.3).long()
    return model, X, y


def _cnn(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(24, 8), nn.ReLU(), nn.Linear(8, 3),
    ).double()  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(32, 1, 8, 8, generator=gen, dtype=torch.float64)
    return model, X, torch.randint(0, 3, (32,), generator=gen)


def _train(model, X, y, steps, **kw):
    opt = HESSO(model, **kw)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    return opt


@pytest.mark.parametrize(("variant", "kw", "torch_cls", "torch_kw"), BASES)
def test_without_pruning_hesso_is_its_base_optimizer(variant, kw, torch_cls, torch_kw):
    model, X, y = _mlp()
    twin = nn.Sequential(*[m for m in _mlp()[0]])
    wd = kw.get("weight_decay", 0.0)
    ref = torch_cls(twin.parameters(), lr=0.05, weight_decay=wd, **torch_kw)
    _train(
        model, X, y, 12, lr=0.05, pruning_steps=4, target_group_sparsity=0.0, variant=variant, **kw
    )
    for _ in range(12):
        ref.zero_grad()
        F.cross_entropy(twin(X), y).backward()
        ref.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("periods", [1, 3])
def test_chosen_groups_are_exactly_zero_and_the_target_is_met(periods):
    model, X, y = _mlp()
    opt = _train(
        model, X, y, 20, lr=0.1, pruning_steps=12, pruning_periods=periods,
        start_pruning_step=3, target_group_sparsity=0.5, momentum=0.9,
    )  # fmt: skip
    result = opt.result()
    assert result.finished and result.total_groups == 18
    assert len(result.units) == 9 and result.group_sparsity == 0.5
    assert result.zero_groups == 9  # exactly zero, and no other group is
    params = dict(model.named_parameters())
    for u in result.units:
        for name, dim, idx in u.slices:
            assert torch.all(params[name].index_select(dim, torch.tensor(idx)) == 0)
    for m in {u.module for u in opt.units}:  # each layer keeps at least one group
        assert sum(u.module == m for u in result.units) < sum(u.module == m for u in opt.units)


def test_groups_shrink_progressively_and_stay_zero():
    model, X, y = _mlp()
    opt = _train(model, X, y, 4, lr=0.1, pruning_steps=8, target_group_sparsity=0.5)
    active = opt.active.clone()
    assert int(active.sum()) == 9 and not opt.result().finished
    norms = opt.index.segment_sum([p.detach() ** 2 for p in model.parameters()])
    assert torch.all(norms[active] > 0)  # half way: shrunk, not yet zero
    with pytest.raises(ValueError, match="not finished"):
        opt.result().apply(model)
    for _ in range(10):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    norms = opt.index.segment_sum([p.detach() ** 2 for p in model.parameters()])
    assert torch.equal(norms == 0, active)


@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_removal_gives_the_outputs_of_the_zeroed_model(case):
    model, X, y = _mlp() if case == "mlp" else _cnn()
    assert len(hesso_groups(model)) == (18 if case == "mlp" else 4 + 6 + 8)
    opt = _train(model, X, y, 10, lr=0.1, pruning_steps=6, target_group_sparsity=0.6)
    result = opt.result()
    small = result.apply(model)
    with torch.no_grad():
        torch.testing.assert_close(small(X), model(X), rtol=1e-12, atol=1e-12)
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small == result.total_params - result.removed_params < result.total_params


def test_transformer_heads_and_neurons_are_removed_with_the_same_outputs():
    model, data, _ = tiny_transformer(width=8, heads=2, layers=2)
    tokens, targets = data[0]
    opt = HESSO(model, lr=0.05, pruning_steps=4, target_group_sparsity=0.5)
    kinds = {u.kind for u in opt.units}
    for _ in range(6):
        opt.zero_grad()
        F.cross_entropy(
            model(tokens).flatten(0, 1), targets.flatten(), ignore_index=-100
        ).backward()
        opt.step()
    result = opt.result()
    assert kinds == {"heads", "channels"} and result.zero_groups == len(result.units) > 0
    small = result.apply(model)
    with torch.no_grad():
        torch.testing.assert_close(small(tokens), model(tokens), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(
            small(tokens), zero_units(model, list(result.units))(tokens), rtol=1e-10, atol=1e-10
        )
    assert sum(p.numel() for p in small.parameters()) == result.total_params - result.removed_params


def test_bert_is_trained_and_pruned_in_one_run():
    model, data, _ = tiny_bert()
    opt = HESSO(model, lr=1e-2, variant="adam", pruning_steps=4, target_group_sparsity=0.4)
    for step in range(6):
        opt.zero_grad()
        model(**data[step % 2]).loss.backward()
        opt.step()
    result = opt.result()
    assert len(result.units) == int(0.4 * result.total_groups) == result.zero_groups
    small = result.apply(model)
    with torch.no_grad():
        for batch in data:
            torch.testing.assert_close(small(**batch).logits, model(**batch).logits)
    assert sum(p.numel() for p in small.parameters()) == result.total_params - result.removed_params


def test_refusals_name_the_fix():
    model, X, y = _mlp()
    with pytest.raises(ValueError, match="variant"):
        HESSO(model, lr=0.1, pruning_steps=4, variant="rmsprop")
    with pytest.raises(ValueError, match="unknown saliency"):
        HESSO(model, lr=0.1, pruning_steps=4, saliency={"hessian": 1.0})
    with pytest.raises(ValueError, match="target_group_sparsity"):
        HESSO(model, lr=0.1, pruning_steps=4, target_group_sparsity=1.0)
    with pytest.raises(ValueError, match="no prunable groups"):
        HESSO(nn.Linear(3, 2), lr=0.1, pruning_steps=4)
    with pytest.raises(ValueError, match="BatchNorm1d"):
        HESSO(
            nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)),
            lr=0.1,
            pruning_steps=4,
        )
    opt = HESSO(model, lr=0.1, pruning_steps=4, cric=CRIC(sampling_steps=2))
    F.cross_entropy(model(X), y).backward()
    with pytest.raises(ValueError, match="needs the loss"):
        opt.step()


def test_saliency_and_scaling_match_a_direct_computation():
    from hesse.prune._hesso_core import SALIENCY, saliency
    from hesse.prune._hesso_groups import GroupIndex

    model, _, _ = _cnn()
    units, named = hesso_groups(model), dict(model.named_parameters())
    index = GroupIndex.build(named, units)
    gen = torch.Generator().manual_seed(1)
    x = [p.detach() for p in named.values()]
    d = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in x]
    names = list(named)

    def gather(ts, u):
        parts = [ts[names.index(n)].index_select(k, torch.tensor(i)) for n, k, i in u.slices]
        return torch.cat([p.reshape(-1) for p in parts])

    raw: dict[str, list] = {k: [] for k in SALIENCY}
    for u in units:
        a, b = gather(x, u), gather(d, u)
        raw["magnitude"].append(a.norm())
        raw["avg_magnitude"].append(a.norm() / a.numel())
        raw["cosine_similarity"].append(a @ b / (a.norm() + 1e-8) / (b.norm() + 1e-8) + 1)
        raw["taylor_first_order"].append((a @ b).abs())
        raw["taylor_second_order"].append(0.5 * (a @ b) ** 2)
    want = sum(0.2 * torch.stack(v) / (torch.stack(v).norm() + 1e-8) for v in raw.values())
    torch.testing.assert_close(saliency(index, x, d, SALIENCY), want, rtol=1e-12, atol=1e-14)
    # a conv2 weight is in its output channel's group (4 + i) and its input channel's (j)
    f = torch.rand(len(units), generator=gen, dtype=torch.float64)
    conv2 = index.scale(x, f)[names.index("3.weight")]
    for i, j in ((2, 1), (5, 3)):
        want_ij = x[names.index("3.weight")][i, j] * f[4 + i] * f[j]
        torch.testing.assert_close(conv2[i, j], want_ij, rtol=1e-14, atol=0)
