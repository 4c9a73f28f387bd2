"""Heads and MLP neurons: group saliencies against brute force, and real removal."""

import io

import pytest
import torch
from prune_cases import tiny_bert, tiny_transformer, zero_units

from hesse import Objective
from hesse.demo import tiny_lm
from hesse.prune import expert_saliency, group_saliency, prune
from hesse.prune._units import find_units


def _outputs(model, data):
    with torch.no_grad():
        if isinstance(data[0], dict):
            return torch.cat(
                [model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in data]
            )
        return torch.cat([model(x).reshape(-1) for x, _ in data])


def _saved_bytes(model) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def test_units_of_the_tiny_transformer():
    model, _, _ = tiny_transformer(layers=2, heads=2, width=8)
    heads, neurons = find_units(model, "heads"), find_units(model, "channels")
    assert len(heads) == 4 and len(neurons) == 2 * 32
    assert heads[1].slices[0] == (
        "blocks.0.attn.qkv_weight",
        0,
        (4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23),
    )


@pytest.mark.parametrize("structure", ["heads", "channels"])
@pytest.mark.parametrize(
    "case", [tiny_transformer, pytest.param(tiny_bert, marks=pytest.mark.slow)]
)
def test_removed_units_are_gone_and_the_model_equals_the_zeroed_one(structure, case):
    if case is tiny_bert:
        pytest.importorskip("transformers")
    model, data, obj = case()
    plan = prune(obj, 0.5, "random", structure=structure)
    pruned = plan.apply(model)
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in pruned.parameters())
    assert before - after == plan.removed_params > 0
    assert _saved_bytes(pruned) < _saved_bytes(model)
    torch.testing.assert_close(
        _outputs(pruned, data),
        _outputs(zero_units(model, plan.units), data),
        rtol=1e-10,
        atol=1e-12,
    )
    modules = {u.module for u in find_units(model, structure)}
    assert {u.module for u in find_units(pruned, structure)} == modules  # each keeps one at least


def test_nvit_group_saliency_equals_per_sample_brute_force():
    model, data, obj = tiny_transformer()
    s = group_saliency(obj, "heads", m=None)
    samples = [(x[i : i + 1], y[i : i + 1]) for x, y in data for i in range(len(x))]
    grads = [Objective(model, [b], loss_fn=tiny_lm.token_loss).gradient() for b in samples]
    params = {n: p.detach() for n, p in model.named_parameters()}
    for unit, score in zip(s.units, s.scores, strict=True):
        brute = 0.0
        for g in grads:
            g = obj.space.split(g)
            dot = 0.0
            for name, dim, idx in unit.slices:
                idx = torch.tensor(idx)
                dot += (params[name].index_select(dim, idx) * g[name].index_select(dim, idx)).sum()
            brute += float(dot) ** 2
        assert float(score) == pytest.approx(brute / len(samples), rel=1e-10)


def test_heapr_score_is_the_output_fisher_form_of_the_exact_output_change():
    model, data, obj = tiny_transformer()
    s = expert_saliency(obj)
    mlp = model.blocks[0].mlp
    total, tokens, captured = torch.zeros(32, dtype=torch.float64), 0, {}
    for x, y in data:
        handle = mlp.register_forward_hook(
            lambda m, i, o: captured.update(x=i[0], y=o) or o.retain_grad()
        )
        loss, w = tiny_lm.token_loss(model, (x, y))
        (loss * w).backward()
        handle.remove()
        model.zero_grad()
        tokens += int(w)
        with torch.no_grad():
            for j in range(32):
                cut = mlp.out_weight.clone()
                cut[:, j] = 0
                hidden = torch.nn.functional.gelu(
                    torch.nn.functional.linear(captured["x"], mlp.in_weight, mlp.in_bias)
                )
                change = torch.nn.functional.linear(hidden, cut, mlp.out_bias) - captured["y"]
                total[j] += float(((captured["y"].grad * change).sum(-1) ** 2).sum())
    torch.testing.assert_close(s.scores, 0.5 * total / tokens, rtol=1e-10, atol=0)
    assert [u.index for u in s.units] == list(range(32))


def test_structured_methods_rank_and_remove_the_same_number():
    model, data, obj = tiny_transformer(layers=2)
    removed = {}
    for method in ("nvit", "heapr", "magnitude", "random"):
        plan = prune(obj, 0.25, method, structure="channels", m=None)
        removed[method] = plan.removed_params
        assert plan.method == method and len(plan.units) == 16
    assert len(set(removed.values())) == 1  # equal removed parameters


def test_layer_scope_removes_the_same_share_per_module():
    _, _, obj = tiny_transformer(layers=2)
    plan = prune(obj, 0.25, "nvit", structure="channels", scope="layer", m=None)
    per_module = {}
    for u in plan.units:
        per_module[u.module] = per_module.get(u.module, 0) + 1
    assert per_module == {"blocks.0.mlp": 8, "blocks.1.mlp": 8}


def test_bad_structured_requests():
    from torch import nn

    _, _, obj = tiny_transformer()
    with pytest.raises(ValueError, match="'heapr' scores MLP neurons"):
        prune(obj, 0.5, "heapr", structure="heads")
    with pytest.raises(ValueError, match="sparsity must be a fraction"):
        prune(obj, 1.0, "nvit", structure="heads")
    x = torch.randn(4, 3)
    plain = Objective(
        nn.Linear(3, 2), [(x, torch.tensor([0, 1, 0, 1]))], loss=nn.functional.cross_entropy
    )
    with pytest.raises(ValueError, match="no heads found in Linear"):
        prune(plain, 0.5, "nvit", structure="heads")
    with pytest.raises(ValueError, match="not MLP modules"):
        expert_saliency(obj, mlp_modules=["blocks.0.attn"])


def test_gradual_structured_pruning_ranks_again_in_the_smaller_model():
    model, data, obj = tiny_transformer(layers=2)
    plan = prune(obj, 0.5, "nvit", structure="heads", recompute=2, m=None)
    assert len(plan.units) == 2 and len({u.module for u in plan.units}) <= 2
    pruned = plan.apply(model)
    assert sum(m.heads for m in pruned.modules() if isinstance(m, tiny_lm.Attention)) == 2
    torch.testing.assert_close(
        _outputs(pruned, data),
        _outputs(zero_units(model, plan.units), data),
        rtol=1e-10,
        atol=1e-12,
    )
