"""Objective and ParamSpace: data layouts, exact weighting, casts, and refused inputs."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hesse
from cases import ALL, DT, SmallCNN, flat_loss, objective, seq_loss_fn

RTOL = 1e-10


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", ALL)
def test_value_and_gradient_equal_full_data_loss(name):
    loss, theta = flat_loss(name)
    obj = objective(name)
    assert obj.dim == theta.numel()
    assert obj.value().dim() == 0
    assert abs(obj.value().item() - loss(theta).item()) <= RTOL * abs(loss(theta).item())
    assert rel(obj.gradient(), torch.func.grad(loss)(theta)) <= RTOL


def _mlp_data(n=12, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT).eval()
    return model, torch.randn(n, 4, dtype=DT), torch.randint(0, 3, (n,))


def test_uneven_batches_are_weighted_by_size():
    model, x, y = _mlp_data()
    full = F.cross_entropy(model(x), y).item()
    batches = [(x[:5], y[:5]), (x[5:10], y[5:10]), (x[10:], y[10:])]
    naive = sum(F.cross_entropy(model(a), b).item() for a, b in batches) / 3
    assert abs(full - naive) > 1e-6  # the test distinguishes exact from naive weighting
    obj = hesse.Objective(model, batches, loss=F.cross_entropy)
    assert obj.value().item() == pytest.approx(full, rel=RTOL)


def test_data_layouts_agree():
    model, x, y = _mlp_data()
    want = F.cross_entropy(model(x), y).item()
    layouts = {
        "one batch": (x, y),
        "list of tuples": [(x[:7], y[:7]), (x[7:], y[7:])],
        "tuple of lists": ([x[:7], y[:7]], [x[7:], y[7:]]),
        "loader": DataLoader(TensorDataset(x, y), batch_size=5),
    }
    for what, data in layouts.items():
        obj = hesse.Objective(model, data, loss=F.cross_entropy)
        assert obj.value().item() == pytest.approx(want, rel=RTOL), what


def test_loader_can_be_passed_over_repeatedly():
    model, x, y = _mlp_data()
    obj = hesse.Objective(
        model, DataLoader(TensorDataset(x, y), batch_size=5), loss=F.cross_entropy
    )
    assert obj.value().item() == obj.value().item()
    assert torch.equal(obj.gradient(), obj.gradient())


def test_dtype_cast_works_on_a_copy():
    model, x, y = _mlp_data()
    model32 = copy.deepcopy(model).float()
    before = copy.deepcopy(model32.state_dict())
    obj = hesse.Objective(model32, [(x.float(), y)], loss=F.cross_entropy, dtype=torch.float64)
    assert obj.dtype == torch.float64
    g = obj.gradient()
    assert g.dtype == torch.float64
    assert rel(g, hesse.Objective(model, [(x, y)], loss=F.cross_entropy).gradient()) < 1e-5
    for k, v in model32.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k])


def test_params_subset_and_restrict():
    model, x, y = _mlp_data()
    full = hesse.Objective(model, (x, y), loss=F.cross_entropy)
    assert full.space.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert full.dim == 20 + 5 + 15 + 3
    sub = hesse.Objective(model, (x, y), loss=F.cross_entropy, params=["2.weight", "2.bias"])
    assert sub.space.names == ["2.weight", "2.bias"]
    assert sub.dim == 18
    assert torch.allclose(sub.gradient(), full.gradient()[25:], rtol=RTOL, atol=0)
    res = full.restrict(["2.weight", "2.bias"])
    assert res.dim == 18
    assert torch.allclose(res.gradient(), full.gradient()[25:], rtol=RTOL, atol=0)


def test_frozen_parameters_are_left_out():
    model, x, y = _mlp_data()
    model[0].weight.requires_grad_(False)
    obj = hesse.Objective(model, (x, y), loss=F.cross_entropy)
    assert obj.space.names == ["0.bias", "2.weight", "2.bias"]


def test_param_space_split_join_blocks():
    space = objective("block_ce").space
    assert space.names == [
        "ln.weight",
        "ln.bias",
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
        "head.weight",
        "head.bias",
    ]
    numels = space.numels
    assert space.dim == sum(numels.values() if isinstance(numels, dict) else numels) == 121
    slices = space.slices()
    assert slices["fc1.weight"] == slice(10, 50)
    v = torch.arange(space.dim, dtype=DT)
    parts = space.split(v)
    assert parts["fc1.weight"].shape == (8, 5)
    assert torch.equal(parts["fc1.weight"].flatten(), v[10:50])
    assert torch.equal(space.join(parts), v)
    V = torch.randn(space.dim, 4, dtype=DT)
    parts = space.split(V)
    assert parts["fc2.weight"].shape == (4, 5, 8)
    assert torch.equal(space.join(parts), V)
    assert space.blocks(by="param") == {n: [n] for n in space.names}
    assert space.blocks(by="module") == {
        "ln": ["ln.weight", "ln.bias"],
        "fc1": ["fc1.weight", "fc1.bias"],
        "fc2": ["fc2.weight", "fc2.bias"],
        "head": ["head.weight", "head.bias"],
    }


def test_dict_batch_weights_count_labels_not_ignored():
    obj = objective("dict_ce")
    loss, theta = flat_loss("dict_ce")
    assert obj.value().item() == pytest.approx(loss(theta).item(), rel=RTOL)


# ---------------------------------------------------------------- refused inputs


def test_refuses_active_dropout():
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3)).to(DT).train()
    _, x, y = _mlp_data()
    with pytest.raises(ValueError, match="(?i)dropout"):
        hesse.Objective(model, (x, y), loss=F.cross_entropy).value()


def test_refuses_batch_norm_in_train_mode_unless_allowed():
    model = SmallCNN().to(DT).train()
    x, y = torch.randn(4, 1, 6, 6, dtype=DT), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="(?i)eval"):
        hesse.Objective(model, (x, y), loss=F.cross_entropy).value()
    obj = hesse.Objective(model, (x, y), loss=F.cross_entropy, allow_train_mode=True)
    assert torch.isfinite(obj.value())


def test_refuses_non_finite_loss_and_names_the_batch():
    model, x, y = _mlp_data(16)
    batches = [(x[i : i + 4].clone(), y[i : i + 4]) for i in range(0, 16, 4)]
    batches[2][0][1, 0] = float("nan")
    with pytest.raises(ValueError) as err:
        hesse.Objective(model, batches, loss=F.cross_entropy).value()
    msg = str(err.value)
    assert re.search("(?i)finite|nan", msg), msg
    # The third batch: "batch 2" counting from 0 (or "batch 3" counting from 1).
    assert re.search(r"(?i)batch\D{0,12}[23]\b", msg), msg


def test_refuses_empty_data():
    model, _, _ = _mlp_data()
    with pytest.raises(ValueError, match="(?i)empty"):
        hesse.Objective(model, [], loss=F.cross_entropy).value()


def test_refuses_model_without_trainable_parameters():
    model, x, y = _mlp_data()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="(?i)trainable|requires.grad"):
        hesse.Objective(model, (x, y), loss=F.cross_entropy)


def test_refuses_a_generator_as_data():
    model, x, y = _mlp_data()
    gen = ((x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4))
    with pytest.raises(ValueError, match="(?i)generator|iterator|list|DataLoader"):
        hesse.Objective(model, gen, loss=F.cross_entropy)


@pytest.mark.parametrize("both", [True, False])
def test_refuses_loss_and_loss_fn_both_or_neither_for_tuple_batches(both):
    model, x, y = _mlp_data()
    kw = {"loss": F.cross_entropy, "loss_fn": seq_loss_fn}
    with pytest.raises(ValueError, match="(?i)loss"):
        hesse.Objective(model, (x, y), **(kw if both else {})).value()


def test_allow_train_mode_leaves_the_model_buffers_alone():
    model = SmallCNN().to(DT).train()
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randn(6, 1, 6, 6, dtype=DT), torch.tensor([0, 1, 2, 0, 1, 2])
    obj = hesse.Objective(model, (x, y), loss=F.cross_entropy, allow_train_mode=True)
    obj.value()
    obj.value()
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name


def test_refuses_attention_dropout():
    model = nn.MultiheadAttention(4, 2, dropout=0.1).train()
    with pytest.raises(ValueError, match="dropout"):
        hesse.Objective(model, [(torch.randn(3, 4), torch.randn(3, 4))], loss=F.mse_loss)


def test_tuple_batches_do_not_count_ignored_labels():
    torch.manual_seed(0)
    model = nn.Linear(3, 4).to(DT)
    x, y = torch.randn(6, 3, dtype=DT), torch.tensor([0, 1, -100, 3, 2, -100])
    split = hesse.Objective(model, [(x[:2], y[:2]), (x[2:], y[2:])], loss=F.cross_entropy)
    whole = F.cross_entropy(model(x), y)
    assert torch.allclose(split.value(), whole, atol=1e-12, rtol=0)


def test_ggn_refuses_nll_loss():
    model = nn.Sequential(nn.Linear(3, 4), nn.LogSoftmax(-1))
    obj = hesse.Objective(
        model, (torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0])), loss=F.nll_loss
    )
    with pytest.raises(ValueError, match="cross_entropy"):
        hesse.GGNOperator(obj)
