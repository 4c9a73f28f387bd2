"""KFAC's exact dense blocks, built together over the union of the dense groups.

Each must equal the block built alone (the curvature operator of its group's restriction,
densified), for BERT and GPT-2 from configs and every curvature kind.
"""

import pytest
import torch

from hesse import EKFACOperator, FisherOperator, GGNOperator, KFACOperator, Objective
from hesse.operators._kfac_dense import dense_blocks
from hesse.operators._kfac_layers import find_groups

pytest.importorskip("transformers")

from hf_models import bert_classifier, classifier_batches, gpt2_lm, lm_batches  # noqa: E402

DT = torch.float64
KINDS = ("exact", "empirical", "mc")


def _alone(obj: Objective, names, kind: str) -> torch.Tensor:
    """The block of one group built on its own (the former construction)."""
    sub = obj.restrict(list(names))
    if kind == "exact":
        op = GGNOperator(sub, psd=True)
    else:
        op = FisherOperator(sub, kind, mc_samples=2, seed=3)
    M = op.to_dense()
    return (M + M.T) / 2


def _gpt2() -> Objective:
    return Objective(gpt2_lm(layers=2, embd=8, heads=2, vocab=20), lm_batches(vocab=20))


def _bert() -> Objective:
    model = bert_classifier(hidden=8, layers=2, heads=2, intermediate=11, vocab=30)
    return Objective(model, classifier_batches(vocab=30))


@pytest.fixture(scope="module", params=["gpt2", "bert"])
def objective(request):
    return {"gpt2": _gpt2, "bert": _bert}[request.param]()


@pytest.mark.parametrize("kind", KINDS)
def test_union_blocks_equal_the_blocks_built_alone(objective, kind):
    K = KFACOperator(objective, kind, mc_samples=2, seed=3)
    groups = [g for g in find_groups(objective, K.max_dense, "test") if g.dense]
    assert len(groups) >= 3  # the LayerNorms (and BERT's embeddings) at least
    for g in groups:
        got, want = K.factors[g.label].matrix, _alone(objective, g.names, kind)
        assert got.shape == want.shape and want.norm() > 0
        assert (got - want).abs().max() <= 1e-12 * want.abs().max(), g.label


@pytest.mark.parametrize(
    "kind, options",
    [
        ("exact", {"max_bytes": 0}),  # a vjp per column instead of the kept tangents
        ("exact", {"block_size": 3}),
        ("empirical", {"per_row": True, "block_size": 2}),
        ("empirical", {"per_row": False, "block_size": 3}),
        ("mc", {"per_row": True}),
        ("mc", {"per_row": False}),
    ],
)
def test_every_path_gives_the_blocks_built_alone(kind, options):
    obj = _gpt2()
    groups = find_groups(obj, 4096, "test")
    got = dense_blocks(obj, groups, kind, mc_samples=2, seed=3, **options)
    assert sorted(got) == [gi for gi, g in enumerate(groups) if g.dense]
    for gi, block in got.items():
        assert block.names == list(groups[gi].names)
        want = _alone(obj, groups[gi].names, kind)
        assert (block.matrix - want).abs().max() <= 1e-12 * want.abs().max(), groups[gi].label


def test_ekfac_uses_the_same_exact_blocks():
    obj = _gpt2()
    K, E = KFACOperator(obj, "empirical"), EKFACOperator(obj, "empirical")
    for label, block in K.factors.items():
        if hasattr(block, "matrix"):
            torch.testing.assert_close(E.factors[label].matrix, block.matrix, rtol=0, atol=0)


def test_no_dense_group_builds_no_operator():
    x = torch.randn(6, 3, dtype=DT)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    obj = Objective(model.to(DT), (x, torch.randint(0, 2, (6,))), loss="cross_entropy")
    groups = find_groups(obj, 4096, "test")
    assert not any(g.dense for g in groups) and dense_blocks(obj, groups, "exact") == {}


def test_a_batch_with_every_label_ignored_adds_nothing():
    batches = lm_batches(vocab=20)
    batches[1]["labels"] = torch.full_like(batches[1]["labels"], -100)
    obj = Objective(gpt2_lm(layers=1, embd=8, heads=2, vocab=20), batches)
    groups = find_groups(obj, 4096, "test")
    for per_row in (True, False):
        got = dense_blocks(obj, groups, "empirical", per_row=per_row)
        for gi, block in got.items():
            want = _alone(obj, groups[gi].names, "empirical")
            assert (block.matrix - want).abs().max() <= 1e-12 * want.abs().max()
