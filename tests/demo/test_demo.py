import os

import pytest
import torch

from hesse import demo as demo_module
from hesse.demo import load_demo


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "hesse-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HESSE_CACHE_DIR", str(path))
        yield path


def test_digits_trains_to_a_moderate_loss_and_is_cached(cache):
    demo = load_demo("digits")
    assert demo.inputs.shape == (1797, 1, 8, 8) and demo.n_classes == 10
    assert demo.training["final_loss"] <= 0.1 and demo.training["accuracy"] > 0.95
    assert sum(p.numel() for p in demo.model.parameters()) < 25_000
    assert not demo.model.training
    again = load_demo("digits")
    for a, b in zip(demo.model.parameters(), again.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [f for f in os.listdir(cache) if f.endswith(".tmp")] == []


def test_digits_batches_cover_the_first_samples():
    demo = load_demo("digits")
    batches = demo.batches(samples=200, batch_size=64)
    assert [len(x) for x, _ in batches] == [64, 64, 64, 8]
    assert torch.equal(torch.cat([y for _, y in batches]), demo.targets[:200])


def test_digits_mse_has_one_hot_targets_and_its_own_cache_entry():
    ce, mse = demo_module.DEMOS["digits"].Config(), demo_module.DEMOS["digits"].Config(loss="mse")
    assert demo_module._config_hash("digits", ce) != demo_module._config_hash("digits", mse)
    _, targets = demo_module.DEMOS["digits"].dataset(mse)
    assert targets.shape == (1797, 10) and torch.all(targets.sum(1) == 1)


def test_tiny_lm_weights_batches_by_tokens_and_splits_attention_from_mlp():
    demo = load_demo("tiny-lm")
    assert demo.loss is None and demo.loss_fn is not None
    x, y = demo.batches(samples=16)[0]
    loss, n_tokens = demo.loss_fn(demo.model, (x, y))
    assert n_tokens == (y != -100).sum() and 0 < int(n_tokens) < y.numel()
    assert loss.item() < torch.log(torch.tensor(float(demo.n_classes))).item()
    modules = {name.rpartition(".")[0] for name, _ in demo.model.named_parameters()}
    assert {"blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"} <= modules


def test_unknown_demo_names_the_choices():
    with pytest.raises(ValueError, match="digits, tiny-lm"):
        load_demo("mnist")


def test_holdout_trains_on_the_rest_with_its_own_cache_entry():
    digits = demo_module.DEMOS["digits"]
    plain = demo_module._config_hash("digits", digits.Config())
    assert demo_module._config_hash("digits", digits.Config(holdout=0.2)) != plain
    demo = load_demo("digits", holdout=0.2)
    assert len(demo.inputs) == 1438 and len(demo.test_inputs) == 359
    everything = torch.cat([demo.inputs, demo.test_inputs]).flatten(1)
    assert len(torch.unique(everything, dim=0)) == len(
        torch.unique(load_demo("digits").inputs.flatten(1), dim=0)
    )
    assert sum(len(x) for x, _ in demo.test_batches(batch_size=100)) == 359
    assert "holding out 359" in demo.description
    with pytest.raises(ValueError, match="no held-out samples"):
        load_demo("digits").test_batches()
    with pytest.raises(ValueError, match=r"holdout must be in \[0, 1\)"):
        load_demo("digits", holdout=1.0)
