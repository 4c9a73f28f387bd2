"""Shared test helpers: ``assert_operator_matches`` (also as a fixture of the same name)."""

import numpy as np
import pytest
import torch

# Every test matrix is tiny: intra-op threads only add spin-waits, which made the suite 10-100x
# slower on a shared 2-core machine. One thread keeps timings stable.
torch.set_num_threads(1)


def _check(got, want, scale, what, rtol):
    got = torch.as_tensor(np.asarray(got) if not torch.is_tensor(got) else got)
    got = got.to(want.dtype)
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)}"
    err = (got - want).norm().item() / scale
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"


def _block_index(space, names):
    slices = space.slices()
    return torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in names])


def assert_operator_matches(op, dense, rtol=1e-10, count=True):
    """Check every way of using ``op`` against the dense matrix ``dense`` (d, d).

    Products with a vector (d,), a matrix (d, k), ``matvec``/``matmat``, ``to_dense()``,
    ``to_scipy()`` (vector and matrix), the matvec count, and, when the operator has a
    ``space``, ``restrict`` to a subset of parameters and products with every block of
    ``blocks()``.
    ``count=False`` skips the matvec-count check (for composite operators).
    Errors are relative: ``||got - want||_F <= rtol * ||dense||_F * ||input||_F``.
    """
    dense = dense.detach()
    d = dense.shape[0]
    assert tuple(op.shape) == (d, d)
    gen = torch.Generator().manual_seed(1234)
    v = torch.randn(d, generator=gen, dtype=dense.dtype)
    V = torch.randn(d, 3, generator=gen, dtype=dense.dtype)
    norm = max(dense.norm().item(), 1e-300)

    before = op.n_matvecs
    _check(op @ v, dense @ v, norm * v.norm().item(), "op @ v", rtol)
    assert not count or op.n_matvecs - before == 1, "a (d,) product counts one matvec"
    before = op.n_matvecs
    _check(op @ V, dense @ V, norm * V.norm().item(), "op @ V", rtol)
    assert not count or op.n_matvecs - before == 3, "a (d, 3) product counts three matvecs"
    _check(op.matvec(v), dense @ v, norm * v.norm().item(), "matvec", rtol)
    _check(op.matmat(V), dense @ V, norm * V.norm().item(), "matmat", rtol)
    _check(op.to_dense(), dense, norm, "to_dense", rtol)

    lin = op.to_scipy()
    assert tuple(lin.shape) == (d, d)
    assert np.dtype(lin.dtype) == np.float64
    _check(lin.matvec(v.numpy()), dense @ v, norm * v.norm().item(), "to_scipy matvec", rtol)
    _check(lin.matmat(V.numpy()), dense @ V, norm * V.norm().item(), "to_scipy matmat", rtol)
    _check(lin @ v.numpy(), dense @ v, norm * v.norm().item(), "to_scipy @", rtol)

    space = op.space
    if space is None:
        return
    # Blocks are checked through products with two random vectors each (cheap), the restricted
    # operator also through its dense form.
    names = space.names
    subset = [names[0], names[-1]] if len(names) > 1 else names
    idx = _block_index(space, subset)
    sub = op.restrict(subset)
    want = dense[idx][:, idx]
    assert tuple(sub.shape) == tuple(want.shape)
    assert list(sub.space.names) == subset
    _check(sub.to_dense(), want, norm, f"restrict({subset})", rtol)
    for by in ("param", "module", "block"):
        expected = space.blocks(by=by)
        blocks = op.blocks(by=by)
        assert list(blocks) == list(expected), f"blocks(by={by!r}) keys"
        for key, block in blocks.items():
            idx = _block_index(space, expected[key])
            W = V[: len(idx), :2]
            want = dense[idx][:, idx] @ W
            _check(block @ W, want, norm * W.norm().item(), f"block {key!r}", rtol)


@pytest.fixture(name="assert_operator_matches")
def _assert_operator_matches_fixture():
    return assert_operator_matches


LABELS = {"id2label": {0: "neg", 1: "pos"}, "label2id": {"neg": 0, "pos": 1}}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A saved BertForSequenceClassification with labels neg/pos and its tokenizer."""
    pytest.importorskip("transformers")
    from hf_folders import save_bert

    return save_bert(tmp_path_factory.mktemp("bert"), **LABELS)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A saved GPT2LMHeadModel and a tokenizer without a padding token."""
    pytest.importorskip("transformers")
    from hf_folders import save_gpt2

    return save_gpt2(tmp_path_factory.mktemp("gpt2"))
