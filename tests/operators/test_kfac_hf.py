"""KFAC and EKFAC on a tiny GPT-2 as it comes: tied embeddings, Conv1D, LayerNorm, -100 labels."""

import pytest
import torch

import hesse
from hesse import EKFACOperator, KFACOperator, Objective, reference

pytest.importorskip("transformers")

from hf_models import IGNORE, gpt2_lm  # noqa: E402

DT = torch.float64
VOCAB = 20


def _model():
    return gpt2_lm(layers=1, embd=8, heads=2, vocab=VOCAB, positions=16)


def _sequences():
    """Token rows of lengths 6, 3, 5, 2, 4; the first two tokens of row 0 are a masked prompt."""
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randint(1, VOCAB, (n,), generator=gen) for n in (6, 3, 5, 2, 4)]
    labels = [r.clone() for r in rows]
    labels[0][:2] = IGNORE
    return rows, labels


def _batches(split, pad_to=0):
    """Dict batches of the rows ``split`` into groups, right-padded (at least to ``pad_to``)."""
    rows, labels = _sequences()
    out, start = [], 0
    for n in split:
        chunk, chunk_labels = rows[start : start + n], labels[start : start + n]
        length = max(pad_to, *(len(r) for r in chunk))
        ids = torch.zeros(n, length, dtype=torch.long)
        mask, y = torch.zeros_like(ids), torch.full_like(ids, IGNORE)
        for i, (r, lab) in enumerate(zip(chunk, chunk_labels, strict=True)):
            ids[i, : len(r)], mask[i, : len(r)], y[i, : len(r)] = r, 1, lab
        out.append({"input_ids": ids, "attention_mask": mask, "labels": y})
        start += n
    return out


@pytest.fixture(scope="module")
def gpt2():
    obj = Objective(_model(), _batches((3, 2)))
    return obj, KFACOperator(obj)


def test_gpt2_builds_with_every_parameter_and_is_symmetric_psd(gpt2):
    obj, K = gpt2
    assert K.shape == (obj.dim, obj.dim) and K.space.names == obj.space.names
    assert list(K.factors) == [
        "transformer.wte+lm_head",
        "transformer.wpe",
        "transformer.h.0.ln_1",
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.ln_2",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
        "transformer.ln_f",
    ]
    assert len(K.factors["transformer.wte+lm_head"].terms) == 2  # both uses of the tied weight
    D = K.to_dense()
    assert (D - D.T).abs().max() <= 1e-14 * D.abs().max()
    assert torch.linalg.eigvalsh(D).min() >= -1e-12 * D.abs().max()
    assert torch.isfinite(D).all() and D.norm() > 0


def test_gpt2_layer_norm_blocks_are_exact(gpt2):
    obj, K = gpt2
    names = ["transformer.h.0.ln_2.weight", "transformer.h.0.ln_2.bias"]
    want = reference.dense_ggn(obj.restrict(names))
    got = K.restrict(names).to_dense()
    assert (got - want).norm() <= 1e-10 * want.norm()


def test_gpt2_matrix_does_not_depend_on_batching_or_padding(gpt2):
    _, K = gpt2
    other = KFACOperator(Objective(_model(), _batches((1, 2, 2), pad_to=7)))
    want = K.to_dense()
    assert (other.to_dense() - want).norm() <= 1e-10 * want.norm()


def test_gpt2_ekfac_runs_and_its_spectrum_is_its_scalings():
    obj = Objective(_model(), _batches((3, 2)))
    E = EKFACOperator(obj, kind="mc", seed=1)
    values = E.eigenvalues()
    assert values.shape == (obj.dim,) and torch.isfinite(values).all() and values.min() >= 0
    assert abs(E.trace() - float(values.sum())) <= 1e-10 * float(values.sum())
    v = torch.randn(obj.dim, dtype=DT, generator=torch.Generator().manual_seed(0))
    back = E @ (E.inverse(1e-3) @ v) + 1e-3 * (E.inverse(1e-3) @ v)
    assert (back - v).norm() <= 1e-8 * v.norm()


def test_gpt2_factor_bytes_count_the_tied_weight_twice():
    obj = Objective(_model(), _batches((5,)))
    item = 8
    wte = VOCAB + 8 * 8 + VOCAB * VOCAB + 8 * 8  # embedding: counts, width^2; head: V^2, width^2
    assert KFACOperator.factor_bytes(obj) >= item * wte
    assert hesse.KFACOperator.factor_bytes(obj) == KFACOperator.factor_bytes(obj)


def test_gpt2_per_position_layers_are_exact_with_one_counted_token():
    # one sequence, one counted label: every layer applied per position after the attention
    # sees one position with a gradient, where KFAC is exact
    rows, _ = _sequences()
    ids = rows[0][None]
    labels = torch.full_like(ids, IGNORE)
    labels[0, 4] = ids[0, 4]
    obj = Objective(
        _model(), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    )
    K = KFACOperator(obj)
    for layer in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        names = [f"transformer.h.0.{layer}.weight", f"transformer.h.0.{layer}.bias"]
        want = reference.dense_ggn(obj.restrict(names))
        got = K.restrict(names).to_dense()
        assert (got - want).norm() <= 1e-10 * want.norm(), layer


def _conv1d_matrix_index(n_in, n_out):
    """Positions of a Conv1D's (weight (in, out), bias) flat block in its [W^T | b] matrix."""
    W = torch.arange(n_in * n_out).reshape(n_in, n_out).T
    b = n_in * n_out + torch.arange(n_out)
    return torch.cat([W, b[:, None]], 1).reshape(-1)


def test_gpt2_ekfac_scalings_are_the_ggn_diagonal_in_its_eigenbasis():
    obj = Objective(_model(), _batches((3, 2)))
    E = EKFACOperator(obj)
    K = KFACOperator(obj)
    cases = {
        "transformer.h.0.mlp.c_fc": _conv1d_matrix_index(8, 32),
        "transformer.h.0.attn.c_attn": _conv1d_matrix_index(8, 24),
        "transformer.wte+lm_head": torch.arange(VOCAB * 8),  # the tied weight, (V, D) as stored
    }
    for label, idx in cases.items():
        block = E.factors[label]
        G = reference.dense_ggn(obj.restrict(block.names))
        QL = torch.eye(block.layout.rows, dtype=DT) if block.QL is None else block.QL
        Q = torch.kron(QL, block.QR)
        want = torch.diagonal(Q.T @ G[idx][:, idx] @ Q)
        assert (block.S.reshape(-1) - want).abs().max() <= 1e-10 * want.abs().max(), label
        # the best diagonal in that basis: never further from the block than KFAC
        kfac = K.restrict(block.names).to_dense()
        ekfac = E.restrict(block.names).to_dense()
        assert (ekfac - G).norm() <= (kfac - G).norm() * (1 + 1e-12), label


def test_bert_key_biases_whose_gradient_softmax_cancels_are_not_refused():
    # a key bias adds q·b to every score of a query, which softmax cancels: its gradient is
    # round-off, and the coverage check refused it for a "relative difference" of round-off
    from hf_models import bert_classifier, classifier_batches

    torch.manual_seed(0)
    obj = Objective(
        bert_classifier(torch.float64), classifier_batches(sizes=(8, 8), lengths=(12, 9))
    )
    K = KFACOperator(obj)
    assert K.shape == (obj.dim, obj.dim)
    assert "bert.encoder.layer.0.attention.self.key" in K.factors
