"""Curvature operators of a model: kept states, and Monte-Carlo draws keyed on sample positions."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hesse
from cases import CASES, DT, WITH_LOSS, dense, objective
from ranks import run_ranks

# ------------------------------------------------------------------ kept states


@pytest.mark.parametrize("name", WITH_LOSS)
def test_cached_ggn_matches_reference_on_every_product(name, assert_operator_matches):
    op = hesse.GGNOperator(objective(name))
    op @ torch.ones(op.shape[0], dtype=DT)
    assert op.cache_bytes > 0  # the products below run through the kept linearizations
    assert_operator_matches(op, dense("ggn", name))


@pytest.mark.parametrize("kind", ["ggn", "fisher"])
def test_uncached_linearizations_match_the_cached_ones(kind):
    build = {"ggn": hesse.GGNOperator, "fisher": hesse.FisherOperator}[kind]
    obj = objective("block_ce")
    V = torch.randn(obj.dim, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    cached, uncached = build(obj), build(obj, max_cache_bytes=0)
    for _ in range(2):
        assert torch.allclose(cached @ V, uncached @ V, rtol=1e-12, atol=1e-14)
    assert cached.cache_bytes > 0 and uncached.cache_bytes == 0


@pytest.mark.parametrize(
    ("build", "reference"),
    [
        (hesse.HessianOperator, hesse.reference.dense_hessian),
        (hesse.GGNOperator, hesse.reference.dense_ggn),
        (hesse.FisherOperator, hesse.reference.dense_fisher),
    ],
)
def test_kept_states_follow_in_place_parameter_changes(build, reference):
    model, data, kw = CASES["mlp_ce"].build()
    obj = hesse.Objective(model, data, **kw)
    op = build(obj)
    v = torch.randn(obj.dim, generator=torch.Generator().manual_seed(0), dtype=DT)
    op @ v
    assert op.cache_bytes > 0
    with torch.no_grad():
        model[0].weight.mul_(-0.5)  # the objective's parameters are views of the model's
    want = reference(hesse.Objective(model, data, **kw)) @ v
    assert torch.allclose(op @ v, want, rtol=1e-10, atol=1e-12)


def test_restricted_ggn_drops_the_kept_linearizations(assert_operator_matches):
    obj = objective("cnn_bn_ce")
    G = hesse.GGNOperator(obj)
    G @ torch.ones(obj.dim, dtype=DT)
    block = G.restrict(["fc.weight", "fc.bias"])
    assert block.cache_bytes == 0
    slices = obj.space.slices()
    idx = torch.cat(
        [torch.arange(slices[n].start, slices[n].stop) for n in ["fc.weight", "fc.bias"]]
    )
    want = dense("ggn", "cnn_bn_ce")[idx][:, idx]
    assert ((block.to_dense() - want).norm() / want.norm()).item() <= 1e-10


def test_ggn_too_big_to_keep_warns_once():
    G = hesse.GGNOperator(objective("mlp_ce"), max_cache_bytes=10)
    v = torch.ones(G.shape[0], dtype=DT)
    with pytest.warns(UserWarning, match="GGNOperator: the per-batch graphs"):
        G @ v
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = G @ v
    assert torch.allclose(got, dense("ggn", "mlp_ce") @ v, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ Monte-Carlo draws


def test_mc_fisher_of_a_causal_lm_is_fixed_per_seed():
    # default attention, the loss inferred from the model: one draw per kept token
    pytest.importorskip("transformers")
    import hf_models

    names = ["transformer.h.0.attn.c_attn.bias", "transformer.ln_f.bias"]
    obj = hesse.Objective(hf_models.gpt2_lm(), hf_models.lm_batches(), params=names)
    v = torch.randn(obj.dim, generator=torch.Generator().manual_seed(2), dtype=DT)
    a = hesse.FisherOperator(obj, "mc", seed=1)
    b = hesse.FisherOperator(obj, "mc", seed=1, max_cache_bytes=0)
    c = hesse.FisherOperator(obj, "mc", seed=2)
    first = a @ v
    assert torch.isfinite(first).all()
    assert torch.equal(a @ v, first)
    assert torch.allclose(b @ v, first, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(c @ v, first)


def _rebatched(name, sizes):
    """The data of a tuple case cut into batches of ``sizes`` (same samples, same order)."""
    model, data, kw = CASES[name].build()
    x, y = (torch.cat(t) for t in zip(*[(b[0], b[1]) for b in data], strict=True))
    assert sum(sizes) == len(x)
    cuts = torch.tensor(sizes).cumsum(0).tolist()
    batches = [(x[e - n : e], y[e - n : e]) for n, e in zip(sizes, cuts, strict=True)]
    return hesse.Objective(model, batches, **kw, dtype=DT)


@pytest.mark.parametrize(("name", "sizes"), [("mlp_ce", [[5, 5, 2], [12], [1, 7, 4]])])
def test_mc_fisher_does_not_depend_on_the_batching(name, sizes):
    # each sample's draw is keyed on its position in the data, not on its batch
    mats = [hesse.FisherOperator(_rebatched(name, s), "mc", seed=7).to_dense() for s in sizes]
    for M in mats[1:]:
        assert torch.allclose(M, mats[0], rtol=1e-10, atol=1e-13)


def test_mc_fisher_is_the_same_matrix_on_every_product_of_a_loader():
    model, data, kw = CASES["block_ce"].build()  # a DataLoader, shuffle=False
    obj = hesse.Objective(model, data, **kw)
    F_ = hesse.FisherOperator(obj, "mc", seed=3, max_cache_bytes=0)
    V = torch.randn(obj.dim, 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    assert torch.equal(F_ @ V, F_ @ V)
    listed = hesse.Objective(model, list(data), **kw)  # the same batches as a list
    assert torch.allclose(hesse.FisherOperator(listed, "mc", seed=3) @ V, F_ @ V, rtol=1e-12)


def test_mc_fisher_refuses_a_shuffling_loader():
    model, _, kw = CASES["block_ce"].build()
    x, y = torch.randn(10, 5, dtype=DT), torch.randint(0, 3, (10,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    obj = hesse.Objective(model, loader, **kw)
    hesse.FisherOperator(obj, "empirical") @ torch.ones(obj.dim, dtype=DT)  # order is irrelevant
    with pytest.raises(ValueError, match="shuffl"):
        hesse.FisherOperator(obj, "mc") @ torch.ones(obj.dim, dtype=DT)


@pytest.mark.parametrize(
    "loss",
    [
        nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=DT)),
        nn.CrossEntropyLoss(label_smoothing=0.1),
    ],
    ids=["class-weights", "label-smoothing"],
)
def test_mc_fisher_refuses_a_loss_that_is_no_likelihood(loss):
    model, data, _ = CASES["mlp_ce"].build()
    obj = hesse.Objective(model, data, loss=loss, dtype=DT)
    with pytest.raises(ValueError, match="not the negative log-likelihood"):
        hesse.FisherOperator(obj, "mc")
    hesse.GGNOperator(obj)  # the GGN stays available for these losses


@pytest.mark.parametrize("name", ["dict_ce", "mlp_mse"])
def test_mc_fisher_averages_to_the_ggn_over_seeds(name):
    # E over draws of the MC Fisher is the GGN (exactly for softmax cross-entropy and MSE):
    # the mean of V^T F_s V over 150 seeds lies within 5 standard errors of V^T G V. dict_ce
    # has a label -100: a draw in its place would add a sample that the GGN leaves out.
    obj = objective(name)
    V = torch.randn(obj.dim, 3, generator=torch.Generator().manual_seed(5), dtype=DT)
    q = torch.stack([V.T @ (hesse.FisherOperator(obj, "mc", seed=s) @ V) for s in range(150)])
    want = V.T @ dense("ggn", name) @ V
    stderr = q.std(0) / len(q) ** 0.5
    assert (stderr > 0).all()
    z = (q.mean(0) - want) / stderr
    assert z.abs().max() < 5, z


# ------------------------------------------------------------------ one process and two

WORLD = 2


def _problem():
    """An MLP and 4 batches (4, 3, 4, 4 samples): the ranks hold 7 and 8 samples."""
    torch.manual_seed(41)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT).eval()
    x, y = torch.randn(15, 4, dtype=DT), torch.randint(0, 3, (15,))
    cuts = [0, 4, 7, 11, 15]
    return model, [(x[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def _mc_products(obj):
    V = torch.randn(obj.dim, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    return hesse.FisherOperator(obj, "mc", seed=11, mc_samples=2) @ V


def _work(rank):
    model, batches = _problem()
    obj = hesse.Objective(model, batches[2 * rank : 2 * rank + 2], loss=F.cross_entropy)
    return _mc_products(obj)


@pytest.mark.slow
def test_mc_fisher_on_two_processes_equals_one(tmp_path):
    results = run_ranks(_work, tmp_path, WORLD)
    model, batches = _problem()
    want = _mc_products(hesse.Objective(model, batches, loss=F.cross_entropy))
    for rank, got in enumerate(results):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-13), (rank, (got - want).abs().max())


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_mc_samples_is_checked(bad):
    with pytest.raises(ValueError, match="mc_samples"):
        hesse.FisherOperator(objective("mlp_ce"), "mc", mc_samples=bad)


class _Routed(nn.Module):
    """Batches of 8 samples go through ``a``, others through ``b`` (experts a batch skips)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x):
        return self.a(x) if x.shape[0] == 8 else self.b(x)


@pytest.mark.parametrize(
    ("build", "reference"),
    [
        (hesse.HessianOperator, hesse.reference.dense_hessian),
        (hesse.GGNOperator, hesse.reference.dense_ggn),
        (hesse.FisherOperator, hesse.reference.dense_fisher),
    ],
)
def test_a_block_that_some_batches_do_not_reach(build, reference, assert_operator_matches):
    # the restricted products raised "element 0 of tensors does not require grad" on the
    # batch that routes around the block
    torch.manual_seed(0)
    model = _Routed().to(DT).eval()
    data = [
        (torch.randn(8, 3, dtype=DT), torch.randint(0, 2, (8,))),
        (torch.randn(4, 3, dtype=DT), torch.randint(0, 2, (4,))),
    ]
    obj = hesse.Objective(model, data, loss=F.cross_entropy)
    op = build(obj).restrict(["a"])
    assert_operator_matches(op, reference(obj.restrict(["a"])))
