"""The pruning pipeline: masks, sparsity, patterns, gradual steps, the pruned copy, errors."""

import pytest
import torch
from prune_cases import loss_of, trained_mlp

from hesse.prune import PrunePlan, prune


@pytest.fixture(scope="module")
def mlp():
    return trained_mlp()


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["magnitude", "obd", "obs", "mfac", "layer_obs"])
def test_apply_gives_a_pruned_copy_at_the_sparsity_asked(mlp, method):
    model, data, obj = mlp
    before = _weights(model)
    plan = prune(obj, 0.6, method, m=None)
    pruned = plan.apply(model)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert isinstance(plan, PrunePlan) and set(plan.masks) == {"0.weight", "2.weight"}
    after = dict(pruned.named_parameters())
    zeros = sum(int((after[n] == 0).sum()) for n in plan.masks)
    per_layer = round(0.6 * 96) + round(0.6 * 36)  # layer_obs prunes each layer alike
    assert (
        zeros == plan.removed_params == (per_layer if method == "layer_obs" else round(0.6 * 132))
    )
    for n, mask in plan.masks.items():
        assert (after[n][~mask] == 0).all()
    assert torch.equal(after["0.bias"], before["0.bias"])  # biases are not pruned by default
    moved = any(
        not torch.equal(after[n][plan.masks[n]], before[n][plan.masks[n]]) for n in plan.masks
    )
    assert moved == (method in ("obs", "mfac", "layer_obs"))  # only OBS moves the others


def test_second_order_is_measured_better_than_magnitude(mlp):
    """Loss at 70%, measured.

    Global: magnitude 0.514, OBS 0.481. Per layer: magnitude 0.857, OBS 0.454, layer-wise OBS
    0.738. (OBD with the Fisher diagonal loses here: 0.967; so does M-FAC with Fisher blocks
    of 128 weights, 0.545, on these 132 weights.)
    """
    model, data, obj = mlp
    for scope, methods in (("global", ("obs", "mfac")), ("layer", ("obs", "layer_obs"))):
        magnitude = loss_of(prune(obj, 0.7, "magnitude", scope=scope).apply(model), data)
        for method in methods:
            plan = prune(obj, 0.7, method, scope=scope, m=None, fisher_block=None)
            assert loss_of(plan.apply(model), data) < magnitude, (scope, method)


def test_layer_scope_prunes_every_tensor_alike(mlp):
    _, _, obj = mlp
    plan = prune(obj, 0.5, "mfac", scope="layer", m=50)
    for mask in plan.masks.values():
        assert int((~mask).sum()) == round(0.5 * mask.numel())


@pytest.mark.parametrize("method", ["magnitude", "mfac", "layer_obs"])
def test_two_of_four_pattern_in_the_pruned_model(mlp, method):
    model, _, obj = mlp
    plan = prune(obj, None, method, structure="2:4", recompute=2, m=50)
    assert plan.sparsity == 0.5 and plan.skipped == ()
    after = dict(plan.apply(model).named_parameters())
    for n in plan.masks:
        groups = (after[n] != 0).reshape(after[n].shape[0], -1, 4).sum(-1)
        assert (groups <= 2).all()


def test_pattern_rows_it_does_not_divide_are_skipped_or_refused():
    import torch.nn.functional as F
    from torch import nn

    from hesse import Objective

    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).double().eval()
    x = torch.randn(10, 6, dtype=torch.float64)
    obj = Objective(model, [(x, torch.randint(0, 2, (10,)))], loss=F.cross_entropy)
    plan = prune(obj, None, "magnitude", structure="2:4")
    assert plan.skipped == ("0.weight",) and set(plan.masks) == {"2.weight"}
    with pytest.raises(ValueError, match="do not divide the rows of '0.weight'"):
        prune(obj, None, "magnitude", structure="2:4", params=["0.weight"])


def test_gradual_pruning_keeps_pruned_weights_pruned_and_reports_each_step(mlp):
    model, _, obj = mlp
    plan = prune(obj, 0.8, "mfac", recompute=4, m=60)
    assert len(plan.damping) == len(plan.predicted) == 4
    assert all(p >= 0 for p in plan.predicted)
    assert plan.removed_params == round(0.8 * 132)
    plan1 = prune(obj, 0.2, "mfac", m=60)
    # the first step of the gradual plan is the one-shot plan at a quarter of the sparsity
    assert plan.damping[0] == plan1.damping[0]


def test_only_selected_parameters_are_pruned(mlp):
    model, _, obj = mlp
    plan = prune(obj, 0.5, "obd", params=["2.weight"], m=None)
    assert set(plan.masks) == {"2.weight"} and plan.curvature == "fisher"
    assert plan.relative_damping == (0.01,)


def test_bad_requests_are_clear_errors(mlp):
    _, _, obj = mlp
    for bad in (1.0, -0.1, 2):
        with pytest.raises(ValueError, match=r"sparsity must be a fraction in \[0, 1\)"):
            prune(obj, bad, "magnitude")
    with pytest.raises(ValueError, match="method must be one of"):
        prune(obj, 0.5, "snip")
    with pytest.raises(ValueError, match="recompute must be an integer >= 1"):
        prune(obj, 0.5, "magnitude", recompute=0)
    with pytest.raises(ValueError, match="m=500 gradients asked for"):
        prune(obj, 0.5, "mfac", m=500)
    with pytest.raises(ValueError, match="scope must be one of"):
        prune(obj, 0.5, "layer_obs", scope="global")
    with pytest.raises(ValueError, match="pattern must be 'n:m'"):
        prune(obj, None, "magnitude", structure="2-4")
    with pytest.raises(ValueError, match="matches no analysed parameter"):
        prune(obj, 0.5, "magnitude", params=["head.weight"])


@pytest.mark.slow
def test_hugging_face_bert_weights_by_every_method():
    pytest.importorskip("transformers")
    from prune_cases import tiny_bert

    model, data, obj = tiny_bert()
    for method in ("magnitude", "obd", "mfac", "layer_obs"):
        plan = prune(obj, 0.5, method, m=None)
        assert "bert.embeddings.word_embeddings.weight" not in plan.masks
        assert "bert.encoder.layer.0.attention.self.query.weight" in plan.masks
        pruned = plan.apply(model)
        loss = float(type(obj)(pruned, data).value())
        assert loss == loss and loss < 10, method  # finite and sane


def test_default_gradient_count_fits_small_data():
    import torch.nn.functional as F

    from hesse import Objective
    from hesse.prune import collect_gradients

    model = torch.nn.Linear(3, 2)
    data = [(torch.randn(10, 3), torch.randint(0, 2, (10,)))]
    assert collect_gradients(Objective(model, data, F.cross_entropy)).shape == (10, 8)
    with pytest.raises(ValueError, match="m=11 gradients asked for"):
        collect_gradients(Objective(model, data, F.cross_entropy), m=11)
