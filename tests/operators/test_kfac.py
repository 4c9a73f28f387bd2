"""KFAC and EKFAC against dense float64 GGNs: exact where theory says so, and their algebra."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hesse import EKFACOperator, KFACOperator, Objective, reference

DT = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed), dtype=DT)


def _model(seed, *layers):
    """The layers in sequence, in float64, every parameter drawn from N(0, 0.5^2) by ``seed``."""
    model = nn.Sequential(*layers).to(DT).eval()
    gen = _gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=DT))
    return model


def _index(space, names):
    sl = space.slices()
    return torch.cat([torch.arange(sl[n].start, sl[n].stop) for n in names])


def _block(M, space, names):
    idx = _index(space, names)
    return M[idx][:, idx]


def _block_diagonal(G, space, blocks):
    """``G`` with every entry outside the given diagonal blocks set to 0."""
    out = torch.zeros_like(G)
    for names in blocks:
        idx = _index(space, names)
        out[idx[:, None], idx[None, :]] = G[idx][:, idx]
    return out


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _batches(x, t, sizes):
    out, start = [], 0
    for n in sizes:
        out.append((x[start : start + n], t[start : start + n]))
        start += n
    return out


def _module_blocks(obj):
    return list(obj.space.blocks(by="module").values())


class _MeanPool(nn.Module):
    def forward(self, x):
        return x.mean(1)


# ---------------------------------------------------------------------- exact where theory says


def test_deep_linear_mse_kfac_is_the_ggn_block_diagonal(assert_operator_matches):
    model = _model(0, nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 2))
    x, t = _randn(11, 3), _randn(11, 2, seed=1)
    obj = Objective(model, _batches(x, t, (4, 4, 3)), loss=F.mse_loss)
    K = KFACOperator(obj)
    G = reference.dense_ggn(obj)
    for names in _module_blocks(obj):
        assert _rel(_block(K.to_dense(), obj.space, names), _block(G, obj.space, names)) < 1e-10
    assert_operator_matches(K, _block_diagonal(G, obj.space, _module_blocks(obj)), rtol=1e-10)
    assert K.shape == (obj.dim, obj.dim) and K.space.names == obj.space.names
    assert {"symmetric", "psd"} <= K.tags


@pytest.mark.parametrize("loss", [F.mse_loss, F.cross_entropy])
def test_one_sample_through_one_layer_is_exact(loss):
    x = _randn(1, 4)
    t = _randn(1, 3, seed=1) if loss is F.mse_loss else torch.tensor([2])
    obj = Objective(_model(1, nn.Linear(4, 3)), (x, t), loss=loss)
    assert _rel(KFACOperator(obj).to_dense(), reference.dense_ggn(obj)) < 1e-10


def test_reduce_is_exact_on_a_weight_shared_model_with_a_pooled_loss():
    model = _model(2, nn.Linear(3, 4), _MeanPool(), nn.Linear(4, 2))
    x, t = _randn(6, 5, 3), _randn(6, 2, seed=1)
    obj = Objective(model, _batches(x, t, (4, 2)), loss=F.mse_loss)
    G = reference.dense_ggn(obj)
    reduce, expand = KFACOperator(obj, approx="reduce"), KFACOperator(obj, approx="expand")
    first = ["0.weight", "0.bias"]
    assert _rel(_block(reduce.to_dense(), obj.space, first), _block(G, obj.space, first)) < 1e-10
    assert _rel(_block(expand.to_dense(), obj.space, first), _block(G, obj.space, first)) > 1e-2
    want = _block_diagonal(G, obj.space, _module_blocks(obj))
    assert _rel(reduce.to_dense(), want) < 1e-10


def test_expand_is_exact_on_a_weight_shared_model_with_a_loss_per_token():
    model = _model(3, nn.Linear(3, 4), nn.Linear(4, 2))
    x, t = _randn(5, 6, 3), _randn(5, 6, 2, seed=1)
    obj = Objective(model, _batches(x, t, (3, 2)), loss=F.mse_loss)
    G = reference.dense_ggn(obj)
    want = _block_diagonal(G, obj.space, _module_blocks(obj))
    assert _rel(KFACOperator(obj, approx="expand").to_dense(), want) < 1e-10


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_conv2d_patches_are_exact_where_theory_says(approx):
    # expand: one conv layer, loss on every output entry; reduce: conv, global pooling, linear
    conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1)
    x = _randn(4, 2, 6, 5)
    if approx == "expand":
        model = _model(4, conv)
        t = _randn(4, 3, 3, 3, seed=1)
    else:
        model = _model(4, conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
        t = _randn(4, 2, seed=1)
    obj = Objective(model, _batches(x, t, (3, 1)), loss=F.mse_loss)
    G = reference.dense_ggn(obj)
    K = KFACOperator(obj, approx=approx).to_dense()
    names = ["0.weight", "0.bias"]
    assert _rel(_block(K, obj.space, names), _block(G, obj.space, names)) < 1e-10


def test_hugging_face_conv1d_deep_linear_network_is_exact():
    from transformers.pytorch_utils import Conv1D

    model = _model(5, Conv1D(4, 3), Conv1D(2, 4))  # Conv1D(nf=out, nx=in), weight (in, out)
    x, t = _randn(7, 3), _randn(7, 2, seed=1)
    obj = Objective(model, _batches(x, t, (5, 2)), loss=F.mse_loss)
    G = reference.dense_ggn(obj)
    want = _block_diagonal(G, obj.space, _module_blocks(obj))
    assert _rel(KFACOperator(obj).to_dense(), want) < 1e-10


class _TokenModel(nn.Module):
    """Embedding, a linear layer per token and a head (tied to the embedding, or not)."""

    def __init__(self, vocab=7, width=3, tied=True, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(vocab, width, padding_idx=padding_idx)
        self.mid = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.mid(self.emb(ids)))


def _token_data(seed=0, vocab=7):
    ids = torch.randint(0, vocab, (5, 4), generator=_gen(seed))
    return _batches(ids, _randn(5, 4, vocab, seed=seed + 1), (3, 2))


def test_embedding_counts_are_exact_in_a_per_token_linear_model():
    torch.manual_seed(6)
    model = _TokenModel(tied=False, padding_idx=0).to(DT).eval()
    data = _token_data()
    assert any((b[0] == 0).any() for b in data)  # the padding row gets no gradient
    obj = Objective(model, data, loss=F.mse_loss)
    G = reference.dense_ggn(obj)
    want = _block_diagonal(G, obj.space, _module_blocks(obj))
    K = KFACOperator(obj)
    assert _rel(K.to_dense(), want) < 1e-10
    assert K.factors["emb"].terms[0][0].dim() == 1  # the token counts: a diagonal
    assert _rel(EKFACOperator(obj).to_dense(), want) < 1e-10  # KFAC exact: so is EKFAC


def test_tied_weight_block_is_the_sum_of_both_uses():
    torch.manual_seed(7)
    tied = _TokenModel(tied=True).to(DT).eval()
    untied = _TokenModel(tied=False).to(DT).eval()
    untied.load_state_dict(tied.state_dict())
    untied.head.weight = nn.Parameter(tied.emb.weight.detach().clone())
    data = _token_data(seed=3)
    obj_tied = Objective(tied, data, loss=F.mse_loss)
    obj_untied = Objective(untied, data, loss=F.mse_loss)
    assert obj_tied.space.names == ["emb.weight", "mid.weight", "mid.bias"]
    K = KFACOperator(obj_tied)
    assert list(K.factors) == ["emb+head", "mid"]
    G = reference.dense_ggn(obj_untied)  # each use's KFAC is exact here: their sum is the block
    want = _block(G, obj_untied.space, ["emb.weight"]) + _block(
        G, obj_untied.space, ["head.weight"]
    )
    assert _rel(_block(K.to_dense(), obj_tied.space, ["emb.weight"]), want) < 1e-10


# ---------------------------------------------------------------------- EKFAC


def _matrix_index(out_features, in_features):
    """Positions of a Linear's (weight, bias) flat block in its row-major [W | b] matrix."""
    W = torch.arange(out_features * in_features).reshape(out_features, in_features)
    b = out_features * in_features + torch.arange(out_features)
    return torch.cat([W, b[:, None]], 1).reshape(-1)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_ekfac_scalings_are_the_ggn_diagonal_in_the_kronecker_eigenbasis(approx):
    if approx == "expand":
        model = _model(8, nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
        x = _randn(9, 3)
    else:
        model = _model(8, nn.Linear(3, 5), nn.Tanh(), _MeanPool(), nn.Linear(5, 4))
        x = _randn(9, 6, 3)
    y = torch.randint(0, 4, (9,), generator=_gen(1))
    obj = Objective(model, _batches(x, y, (5, 4)), loss=F.cross_entropy)
    E = EKFACOperator(obj, approx=approx)
    G = reference.dense_ggn(obj)
    for label, (n_out, n_in) in {"0": (5, 3), "2" if approx == "expand" else "3": (4, 5)}.items():
        block = E.factors[label]
        Gb = _block(G, obj.space, block.names)
        idx = _matrix_index(n_out, n_in)
        G_matrix = Gb[idx][:, idx]
        Q = torch.kron(block.QL, block.QR)
        want = torch.diagonal(Q.T @ G_matrix @ Q)
        assert (block.S.reshape(-1) - want).abs().max() < 1e-10 * want.abs().max()
    assert math.isclose(float(torch.linalg.eigvalsh(E.to_dense()).sum()), E.trace(), rel_tol=1e-10)


# ---------------------------------------------------------------------- algebra from the factors


def _mixed_objective():
    """Linear, LayerNorm (an exact dense block), tanh, linear; cross-entropy over 2 batches."""
    model = _model(9, nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3))
    x, y = _randn(10, 3), torch.randint(0, 3, (10,), generator=_gen(2))
    return Objective(model, _batches(x, y, (6, 4)), loss=F.cross_entropy)


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
def test_inverse_trace_logdet_and_eigenvalues_match_the_dense_matrix(cls):
    obj = _mixed_objective()
    K = cls(obj)
    D = K.to_dense()
    assert (D - D.T).abs().max() < 1e-14 * D.abs().max()
    lam = 1e-2
    V = _randn(obj.dim, 3, seed=5)
    want = torch.linalg.solve(D + lam * torch.eye(obj.dim, dtype=DT), V)
    assert _rel(K.inverse(lam) @ V, want) < 1e-10
    assert {"symmetric", "psd"} <= K.inverse(lam).tags
    assert math.isclose(K.trace(), float(torch.trace(D)), rel_tol=1e-12)
    spectrum = torch.linalg.eigvalsh(D).flip(0)
    assert (K.eigenvalues() - spectrum).abs().max() < 1e-12 * spectrum.max()
    sign, logdet = torch.linalg.slogdet(D + lam * torch.eye(obj.dim, dtype=DT))
    assert sign > 0 and math.isclose(K.logdet(damping=lam), float(logdet), rel_tol=1e-10)


def test_layer_norm_block_is_the_exact_ggn_block():
    obj = _mixed_objective()
    K = KFACOperator(obj)
    names = ["1.weight", "1.bias"]
    want = reference.dense_ggn(obj.restrict(names))
    assert _rel(K.restrict(names).to_dense(), want) < 1e-12
    alone = KFACOperator(obj.restrict(names))  # nothing to factor: no pass over the data
    assert _rel(alone.to_dense(), want) < 1e-12


def test_tied_block_spectrum_and_inverse_from_its_dense_sum():
    torch.manual_seed(7)
    obj = Objective(_TokenModel(tied=True).to(DT).eval(), _token_data(), loss=F.mse_loss)
    K = KFACOperator(obj)
    D = K.to_dense()
    V = _randn(obj.dim, 2, seed=4)
    want = torch.linalg.solve(D + 0.1 * torch.eye(obj.dim, dtype=DT), V)
    assert _rel(K.inverse(0.1) @ V, want) < 1e-10
    assert (K.eigenvalues() - torch.linalg.eigvalsh(D).flip(0)).abs().max() < 1e-12 * D.norm()
    small = KFACOperator(obj, max_dense=10)
    with pytest.raises(ValueError, match="sum of 2 Kronecker products"):
        small.eigenvalues()


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
def test_blocks_and_restrictions_are_the_dense_blocks(cls, assert_operator_matches):
    obj = _mixed_objective()
    K = cls(obj)
    D = K.to_dense()
    assert_operator_matches(K, D, rtol=1e-12)
    names = ["0.weight"]  # a weight without its bias: EKFAC's eigenbasis is cut
    assert math.isclose(K.restrict(names).trace(), float(torch.trace(_block(D, obj.space, names))))


def test_restricted_kfac_keeps_the_kronecker_form():
    obj = _mixed_objective()
    K = KFACOperator(obj)
    names = ["0.weight", "3.bias"]
    D = _block(K.to_dense(), obj.space, names)
    sub = K.restrict(names)
    assert _rel(sub.to_dense(), D) < 1e-14
    assert math.isclose(sub.trace(), float(torch.trace(D)), rel_tol=1e-12)
    V = _randn(sub.shape[0], 2, seed=6)
    want = torch.linalg.solve(D + 0.5 * torch.eye(D.shape[0], dtype=DT), V)
    assert _rel(sub.inverse(0.5) @ V, want) < 1e-10


def test_singular_block_needs_damping():
    obj = Objective(
        _model(1, nn.Linear(4, 3)), (_randn(2, 4), _randn(2, 3, seed=1)), loss=F.mse_loss
    )
    K = KFACOperator(obj)  # two samples: the activation factor has rank 2 of 5
    with pytest.raises(ValueError, match="singular.*damping > 0"):
        K.inverse() @ torch.ones(obj.dim, dtype=DT)
    assert K.logdet() == -math.inf


# ---------------------------------------------------------------------- kinds and batching


def _classifier(sizes):
    model = _model(10, nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
    x, y = _randn(12, 3, seed=3), torch.randint(0, 4, (12,), generator=_gen(4))
    return Objective(model, _batches(x, y, sizes), loss=F.cross_entropy)


def test_mc_converges_to_exact_like_one_over_sqrt_draws():
    obj = _classifier((7, 5))
    exact = KFACOperator(obj).to_dense()
    draws = (1, 4, 16, 64)
    errors = []
    for m in draws:
        seeds = [
            _rel(KFACOperator(obj, "mc", mc_samples=m, seed=s).to_dense(), exact) for s in range(8)
        ]
        errors.append(sum(seeds) / len(seeds))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    slope = math.log(errors[-1] / errors[0]) / math.log(draws[-1] / draws[0])
    assert -0.75 < slope < -0.3, (slope, errors)


@pytest.mark.parametrize(
    "cls, kind, approx",
    [
        (KFACOperator, "exact", "expand"),
        (KFACOperator, "mc", "reduce"),
        (EKFACOperator, "empirical", "expand"),
    ],
)
def test_same_matrix_whatever_the_batching(cls, kind, approx):
    one = cls(_classifier((12,)), kind, approx, mc_samples=2).to_dense()
    several = cls(_classifier((5, 2, 4, 1)), kind, approx, mc_samples=2).to_dense()
    assert _rel(several, one) < 1e-12


def test_empirical_kind_on_one_sample_is_the_empirical_fisher():
    obj = Objective(
        _model(1, nn.Linear(4, 3)), (_randn(1, 4), torch.tensor([1])), loss=F.cross_entropy
    )
    K = KFACOperator(obj, "empirical")
    assert _rel(K.to_dense(), reference.dense_fisher(obj)) < 1e-10


def test_class_weights_and_ignored_labels_are_weighted_as_the_objective():
    weight = torch.tensor([0.5, 2.0, 1.0], dtype=DT)
    y = torch.tensor([2, -100])
    loss = nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)
    obj = Objective(_model(1, nn.Linear(4, 3)), (_randn(2, 4), y), loss=loss)
    # one counted sample through one layer: exact
    assert _rel(KFACOperator(obj).to_dense(), reference.dense_ggn(obj)) < 1e-10
    with pytest.raises(ValueError, match="class weights or label smoothing"):
        KFACOperator(obj, "mc")


class _CausalAttention(nn.Module):
    """Two causal attention heads written with three ``nn.Linear``, a head on the mean token."""

    def __init__(self, d=8, classes=3):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (f(x).reshape(B, T, 2, D // 2).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(a.transpose(1, 2).reshape(B, T, D).mean(1))


def test_causal_first_query_counts_alike_whatever_its_round_off():
    """``A`` of ``q`` is the same for every kind: query 0 of every sample is left out.

    Query 0 attends to one key, so its gradient is 0 mathematically: in floating point exactly
    0 for some samples and round-off for others.
    """
    model = _model(12, _CausalAttention())
    x = _randn(16, 6, 8, seed=2)
    obj = Objective(model, (x, torch.randint(0, 3, (16,), generator=_gen(3))), F.cross_entropy)
    A = {k: KFACOperator(obj, kind=k).factors["0.q"].terms[0][1] for k in ("exact", "empirical")}
    assert _rel(A["empirical"], A["exact"]) < 1e-12
    rows = torch.cat([x[:, 1:], torch.ones(16, 5, 1, dtype=DT)], 2).reshape(-1, 9)
    assert _rel(A["exact"], rows.T @ rows / rows.shape[0]) < 1e-12  # query 0 of every sample out


# ---------------------------------------------------------------------- coverage and refusals


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_a_weight_used_outside_its_module_is_refused_by_name():
    torch.manual_seed(11)
    model = _Attention().to(DT).eval()
    obj = Objective(model, (_randn(3, 5, 4), _randn(3, 2, seed=1)), loss=F.mse_loss)
    with pytest.raises(ValueError, match=r"'attn\.out_proj\.weight'.*outside their forward"):
        KFACOperator(obj)
    K = KFACOperator(obj.restrict(["attn.in_proj_weight", "attn.in_proj_bias", "head"]))
    assert K.shape[0] == 4 * 12 + 12 + 10
    assert list(K.factors) == ["attn", "head"]


def test_an_unfactored_module_above_max_dense_is_refused_by_name():
    model = _model(1, nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    obj = Objective(model, (_randn(3, 4), _randn(3, 2, seed=1)), loss=F.mse_loss)
    with pytest.raises(ValueError, match=r"module\(s\) 1 \(LayerNorm\).*12 analysed.*max_dense=8"):
        KFACOperator(obj, max_dense=8)


def test_in_place_change_of_a_module_output_is_refused():
    model = _model(1, nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    obj = Objective(model, (_randn(3, 4), _randn(3, 2, seed=1)), loss=F.mse_loss)
    with pytest.raises(ValueError, match="module '0' is modified in place"):
        KFACOperator(obj)


class _Unflatten(nn.Module):
    def forward(self, x):
        return x.reshape(-1, 5, x.shape[-1]).mean(1)


def test_reduce_needs_the_samples_along_dim_0():
    model = _model(1, nn.Flatten(0, 1), nn.Linear(3, 2), _Unflatten())
    obj = Objective(model, (_randn(4, 5, 3), _randn(4, 2, seed=1)), loss=F.mse_loss)
    with pytest.raises(ValueError, match="module '1' is called on an input with 20 rows"):
        KFACOperator(obj, approx="reduce")
    block = EKFACOperator(obj).factors["1"]  # 5 rows per sample, sample-major: summed
    idx = _matrix_index(2, 3)
    Q = torch.kron(block.QL, block.QR)
    want = torch.diagonal(Q.T @ reference.dense_ggn(obj)[idx][:, idx] @ Q)
    assert (block.S.reshape(-1) - want).abs().max() < 1e-10 * want.abs().max()


def test_non_finite_data_is_refused_by_batch():
    x = _randn(4, 3)
    x[3, 0] = math.inf
    obj = Objective(_model(1, nn.Linear(3, 2)), _batches(x, _randn(4, 2), (2, 2)), loss=F.mse_loss)
    with pytest.raises(ValueError, match="non-finite.*batch 1"):
        KFACOperator(obj)


def test_factor_bytes_are_known_before_building():
    obj = _mixed_objective()
    K = KFACOperator(obj)
    held = 0
    for block in K.factors.values():
        tensors = [t for term in getattr(block, "terms", []) for t in term]
        tensors += [block.matrix] if hasattr(block, "matrix") else []
        held += sum(t.numel() * t.element_size() for t in tensors)
    assert KFACOperator.factor_bytes(obj) == held
    assert EKFACOperator.factor_bytes(obj) > 0


def test_bad_settings_are_refused():
    obj = _mixed_objective()
    with pytest.raises(ValueError, match="kind must be one of"):
        KFACOperator(obj, kind="type-2")
    with pytest.raises(ValueError, match="approx must be one of"):
        KFACOperator(obj, approx="mean")
    nll = Objective(
        _model(1, nn.Linear(3, 2)), (_randn(2, 3), torch.tensor([0, 1])), loss=F.nll_loss
    )
    with pytest.raises(ValueError, match="GGN is 0"):
        KFACOperator(nll)
    with pytest.raises(ValueError, match="solver options"):
        KFACOperator(obj).inverse(0.1, method="cg")


def test_a_non_finite_factor_is_named():
    from hesse.operators._kfac_blocks import eigh

    with pytest.raises(ValueError, match="the row factor of block 'fc' has non-finite"):
        eigh(torch.tensor([[1.0, math.nan], [math.nan, 1.0]]), "the row factor of block 'fc'")


# ---------------------------------------------------------------------- processes

WORLD = 2


def _distributed_matrices(obj):
    return torch.stack(
        [
            KFACOperator(obj).to_dense(),
            KFACOperator(obj, "mc", "reduce", seed=3).to_dense(),
            EKFACOperator(obj, "empirical").to_dense(),
        ]
    )


def _rank_work(rank):
    torch.set_num_threads(1)
    shards = (_classifier((5, 2, 4, 1))._data[:2], _classifier((5, 2, 4, 1))._data[2:])
    model = _classifier((12,)).model
    return _distributed_matrices(Objective(model, list(shards[rank]), loss=F.cross_entropy))


@pytest.mark.slow
def test_two_processes_give_the_one_process_matrices(tmp_path):
    from ranks import run_ranks

    results = run_ranks(_rank_work, tmp_path, WORLD)
    want = _distributed_matrices(_classifier((5, 2, 4, 1)))
    for rank, got in enumerate(results):
        assert (got - want).abs().max() <= 1e-12 * want.abs().max(), rank
