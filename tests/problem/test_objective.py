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
from ranks import run_ranks

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


class FunctionalDropout(nn.Module):
    """Dropout applied without a dropout module, as Hugging Face attention applies it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return F.dropout(self.fc(x), p=0.5, training=self.training)


def test_refuses_a_training_mode_model_whose_loss_is_random():
    # today: accepted, and value() changes from call to call
    _, x, y = _mlp_data()
    model = FunctionalDropout().to(DT)
    with pytest.raises(ValueError, match=r"training mode \(the model\) and its loss is random"):
        hesse.Objective(model, (x, y), loss=F.cross_entropy)
    model.eval()
    obj = hesse.Objective(model, (x, y), loss=F.cross_entropy)
    assert obj.value().item() == obj.value().item()
    model.train()
    with pytest.raises(ValueError, match="loss is random"):  # allowing batch-norm is not this
        hesse.Objective(model, (x, y), loss=F.cross_entropy, allow_train_mode=True)


def test_a_training_mode_model_with_a_fixed_loss_is_accepted():
    # a fresh nn.Module is in training mode; without dropout or batch-norm its loss is fixed
    _, x, y = _mlp_data()
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    assert model.training
    obj = hesse.Objective(model, (x, y), loss=F.cross_entropy)
    assert obj.value().item() == obj.value().item()
    model = FixedLoss().to(DT)
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    hesse.Objective(model, (x, y), loss=F.cross_entropy)  # checked twice
    assert torch.equal(torch.random.get_rng_state(), state)  # the user's RNG is left alone


class FixedLoss(nn.Module):
    """A custom module (so its loss is evaluated twice) without randomness."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


def test_refuses_functional_attention_dropout_of_a_hugging_face_model():
    # LLaMA attention has no dropout module: attention_dropout is applied functionally
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=30,
        attention_dropout=0.5,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(DT).train()
    ids = torch.randint(0, 30, (2, 6))
    with pytest.raises(ValueError, match="training mode.*model.eval()"):
        hesse.Objective(model, [{"input_ids": ids, "labels": ids}])
    obj = hesse.Objective(model.eval(), [{"input_ids": ids, "labels": ids}])
    assert obj.value().item() == obj.value().item()


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
    model = nn.Linear(3, 4).to(DT).eval()
    x, y = torch.randn(6, 3, dtype=DT), torch.tensor([0, 1, -100, 3, 2, -100])
    split = hesse.Objective(model, [(x[:2], y[:2]), (x[2:], y[2:])], loss=F.cross_entropy)
    whole = F.cross_entropy(model(x), y)
    assert torch.allclose(split.value(), whole, atol=1e-12, rtol=0)


def test_ggn_refuses_nll_loss():
    model = nn.Sequential(nn.Linear(3, 4), nn.LogSoftmax(-1)).eval()
    obj = hesse.Objective(
        model, (torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0])), loss=F.nll_loss
    )
    with pytest.raises(ValueError, match="cross_entropy"):
        hesse.GGNOperator(obj)


# ---------------------------------------------------------------- ignored labels


def _with_silent_batch():
    """Three batches, the middle one with every label ignored, and the same data without it."""
    model, x, y = _mlp_data(9)
    silent = torch.full((3,), -100)
    data = [(x[:3], y[:3]), (x[3:6], silent), (x[6:], y[6:])]
    return model, data, [data[0], data[2]]


def test_a_batch_with_every_label_ignored_adds_nothing():
    # today: "non-finite loss in batch 1"
    model, data, kept = _with_silent_batch()
    obj = hesse.Objective(model, data, loss=F.cross_entropy)
    want = hesse.Objective(model, kept, loss=F.cross_entropy)
    assert obj.batch_weight(data[1]) == 0
    assert obj.value().item() == pytest.approx(want.value().item(), rel=RTOL)
    assert rel(obj.gradient(), want.gradient()) <= RTOL
    H = hesse.reference.dense_hessian(want)
    assert rel(hesse.HessianOperator(obj).to_dense(), H) <= RTOL
    assert rel(hesse.reference.dense_hessian(obj), H) <= RTOL


def test_loss_fn_reporting_weight_zero_adds_nothing():
    model, data, kept = _with_silent_batch()

    def loss_fn(m, batch):
        x, y = batch
        return F.cross_entropy(m(x), y), (y != -100).sum()  # nan mean, weight 0

    obj = hesse.Objective(model, data, loss_fn=loss_fn)
    want = hesse.Objective(model, kept, loss=F.cross_entropy)
    assert obj.value().item() == pytest.approx(want.value().item(), rel=RTOL)
    assert rel(obj.gradient(), want.gradient()) <= RTOL


def test_data_with_every_label_ignored_is_refused():
    model, x, _ = _mlp_data(6)
    silent = torch.full((3,), -100)
    obj = hesse.Objective(model, [(x[:3], silent), (x[3:], silent)], loss=F.cross_entropy)
    with pytest.raises(ValueError, match="(?i)total weight 0.*ignored"):
        obj.value()


# ---------------------------------------------------------------- batch layouts


class KwargNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, scale):
        return self.fc(x) * scale[:, None]


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, x, s, y):
        self.x, self.s, self.y = x, s, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "scale": self.s[i]}, self.y[i]


def test_dict_inputs_with_tensor_targets():
    # today: KeyError 'labels' for a single (dict, targets) batch
    torch.manual_seed(0)
    model = KwargNet().to(DT).eval()
    x, s, y = torch.randn(7, 4, dtype=DT), 0.5 + torch.rand(7, dtype=DT), torch.randint(0, 3, (7,))
    want = F.cross_entropy(model(x, s), y).item()
    layouts = {
        "one batch": ({"x": x, "scale": s}, y),
        "list": [({"x": x[:4], "scale": s[:4]}, y[:4]), ({"x": x[4:], "scale": s[4:]}, y[4:])],
        "loader": DataLoader(_Pairs(x, s, y), batch_size=3),
    }
    for what, data in layouts.items():
        obj = hesse.Objective(model, data, loss=F.cross_entropy)
        assert obj.value().item() == pytest.approx(want, rel=RTOL), what


class TupleLossNet(nn.Module):
    """Returns ``(loss, logits)`` when given labels, like ``return_dict=False`` models."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, labels=None):
        logits = self.fc(x)
        return (logits,) if labels is None else (F.cross_entropy(logits, labels), logits)


def test_own_loss_as_first_element_of_a_tuple():
    model, x, y = _mlp_data(7)
    model = TupleLossNet().to(DT).eval()
    data = [{"x": x[:4], "labels": y[:4]}, {"x": x[4:], "labels": y[4:]}]
    obj = hesse.Objective(model, data)
    assert obj.loss is None and obj.loss_source == "model(**batch).loss"
    assert obj.value().item() == pytest.approx(F.cross_entropy(model.fc(x), y).item(), rel=RTOL)


@pytest.mark.parametrize("keys", [("x",), ("x", "target")])
def test_dict_batches_without_labels_are_refused_when_built_with_loss(keys):
    # today: built, then value() raises a bare KeyError('labels')
    model = TupleLossNet().to(DT).eval()
    batch = {k: torch.randn(3, 4, dtype=DT) for k in keys}
    with pytest.raises(ValueError, match=r"batch\['labels'\].*loss_fn="):
        hesse.Objective(model, [batch], loss=F.cross_entropy)


def test_dict_batch_without_labels_or_loss_is_refused():
    model = TupleLossNet().to(DT).eval()
    with pytest.raises(ValueError, match="(?i)'labels'"):
        hesse.Objective(model, {"x": torch.randn(3, 4, dtype=DT)})


# ---------------------------------------------------------------- sample positions


def test_sample_positions_of_lists_and_loaders():
    model, x, y = _mlp_data(10)
    obj = hesse.Objective(
        model, [(x[:4], y[:4]), (x[4:7], y[4:7]), (x[7:], y[7:])], loss=F.mse_loss
    )
    assert [obj.sample_positions(i).tolist() for i in range(3)] == [
        [0, 1, 2, 3],
        [4, 5, 6],
        [7, 8, 9],
    ]
    assert obj.sample_positions(1).dtype == torch.long
    with pytest.raises(IndexError):
        obj.sample_positions(3)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    obj = hesse.Objective(model, loader, loss=F.cross_entropy)
    assert obj.restrict("2").sample_positions(2).tolist() == [8, 9]
    sampler = torch.utils.data.DistributedSampler(
        TensorDataset(x, y), num_replicas=2, rank=1, shuffle=False
    )
    obj = hesse.Objective(
        model, DataLoader(TensorDataset(x, y), batch_size=2, sampler=sampler), loss=F.cross_entropy
    )
    assert [obj.sample_positions(i).tolist() for i in range(3)] == [[1, 3], [5, 7], [9]]


def test_refuses_a_distributed_sampler_that_pads_the_data():
    # DistributedSampler(shuffle=False) deals 5 samples to 2 ranks as [0, 2, 4] and [1, 3, 0]:
    # sample 0 twice; today: accepted, and its loss counted twice
    model, x, y = _mlp_data(5)
    data = TensorDataset(x, y)

    def loader(**kw):
        sampler = torch.utils.data.DistributedSampler(data, 2, 1, shuffle=False, **kw)
        return DataLoader(data, batch_size=2, sampler=sampler)

    with pytest.raises(ValueError, match="pads 5 samples to 6.*drop_last=True"):
        hesse.Objective(model, loader(), loss=F.cross_entropy)
    obj = hesse.Objective(model, loader(drop_last=True), loss=F.cross_entropy)
    assert [obj.sample_positions(i).tolist() for i in range(1)] == [[1, 3]]
    want = F.cross_entropy(model(x[[1, 3]]), y[[1, 3]]).item()
    assert obj.value().item() == pytest.approx(want, rel=RTOL)


class _Reshuffled(torch.utils.data.Sampler):
    """A sampler whose order changes on every pass (without being a RandomSampler)."""

    def __init__(self, n):
        self.n, self.passes = n, 0

    def __len__(self):
        return self.n

    def __iter__(self):
        self.passes += 1
        return iter(torch.arange(self.n).roll(self.passes).tolist())


@pytest.mark.parametrize(
    "loader",
    [
        lambda ds: DataLoader(ds, batch_size=4, shuffle=True),
        lambda ds: DataLoader(
            ds,
            batch_size=4,
            sampler=torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True),
        ),
        lambda ds: DataLoader(ds, batch_size=4, sampler=_Reshuffled(len(ds))),
    ],
    ids=["shuffle", "distributed-shuffle", "changing-order"],
)
def test_sample_positions_refuse_a_shuffling_loader(loader):
    model, x, y = _mlp_data(10)
    obj = hesse.Objective(model, loader(TensorDataset(x, y)), loss=F.cross_entropy)
    obj.value()  # the objective itself does not depend on the order
    with pytest.raises(ValueError, match="shuffle=False"):
        obj.sample_positions(0)


# ---------------------------------------------------------------- two processes

WORLD = 2


def _shards():
    """12 samples: rank 0 holds batches of 4 and 3, rank 1 batches of 2 and 3."""
    model, x, y = _mlp_data(12, seed=3)
    cuts = [(0, 4), (4, 7), (7, 9), (9, 12)]
    batches = [(x[a:b], y[a:b]) for a, b in cuts]
    return model, x, y, [batches[:2], batches[2:]]


def _positions_all(obj, n):
    return [obj.sample_positions(i).tolist() for i in range(n)]


def _distributed_work(rank):
    out = {}
    model, x, y, shards = _shards()
    try:  # rank 1 has no data: both ranks must raise, neither may wait forever
        hesse.Objective(model, shards[0] if rank == 0 else [], loss=F.cross_entropy)
    except ValueError as err:
        out["empty"] = str(err)
    obj = hesse.Objective(model, shards[rank], loss=F.cross_entropy)
    out["list"] = _positions_all(obj, 2)
    out["value"] = obj.value().item()
    sampler = torch.utils.data.DistributedSampler(TensorDataset(x, y), shuffle=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, sampler=sampler)
    out["loader"] = _positions_all(hesse.Objective(model, loader, loss=F.cross_entropy), 2)
    return out


@pytest.mark.slow
def test_two_processes_empty_shard_and_sample_positions(tmp_path):
    got = run_ranks(_distributed_work, tmp_path, WORLD, timeout_s=120)
    assert got[0]["empty"] == got[1]["empty"]
    assert re.search(r"(?i)process\(es\) \[1\].*empty", got[0]["empty"]), got[0]["empty"]
    model, x, y, shards = _shards()
    one = hesse.Objective(model, shards[0] + shards[1], loss=F.cross_entropy)
    assert got[0]["list"] + got[1]["list"] == _positions_all(one, 4)
    assert got[0]["value"] == pytest.approx(one.value().item(), rel=RTOL)
    # a non-shuffling DistributedSampler deals samples out in turn; positions stay global
    assert got[0]["loader"] == [[0, 2, 4, 6], [8, 10]]
    assert got[1]["loader"] == [[1, 3, 5, 7], [9, 11]]


def test_with_data_is_the_same_objective_over_other_batches():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x, y = torch.randn(9, 3), torch.randint(0, 2, (9,))
    obj = hesse.Objective(model, [(x[:5], y[:5]), (x[5:], y[5:])], F.cross_entropy, params=["2"])
    one = obj.with_data([(x[5:], y[5:])])
    fresh = hesse.Objective(model, [(x[5:], y[5:])], F.cross_entropy, params=["2"])
    assert one.space.names == fresh.space.names
    assert torch.allclose(one.value(), fresh.value()) and torch.allclose(
        one.gradient(), fresh.gradient()
    )
    assert not torch.allclose(obj.value(), one.value())  # the original keeps its data
