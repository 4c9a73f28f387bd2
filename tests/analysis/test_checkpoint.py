import pytest
import torch

import hesse
from hesse.analysis._checkpoint import Checkpoint, ProductLog, RecordingOperator, TimeUp


def dense(d=6, seed=0):
    A = torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return hesse.DenseOperator(A + A.T)


def test_replay_returns_stored_products_without_recomputing(tmp_path):
    first = dense()
    recorded = RecordingOperator(first, ProductLog(Checkpoint(tmp_path / "ck", {"run": 1})))
    expected = hesse.eigs(recorded, 2, seed=3)
    stored = len(Checkpoint(tmp_path / "ck", {"run": 1}))  # one per product (a block is one)
    assert stored > 0 and first.n_matvecs >= stored

    second = dense()
    log = ProductLog(Checkpoint(tmp_path / "ck", {"run": 1}))
    again = hesse.eigs(RecordingOperator(second, log), 2, seed=3)
    assert second.n_matvecs == 0 and log.replayed == stored
    assert torch.equal(again.values, expected.values)


def test_a_different_input_recomputes_from_there(tmp_path):
    op = RecordingOperator(dense(), ProductLog(Checkpoint(tmp_path / "ck", {})))
    op @ torch.ones(6, dtype=torch.float64)
    op @ torch.ones(6, dtype=torch.float64)
    inner = dense()
    log = ProductLog(Checkpoint(tmp_path / "ck", {}))
    op = RecordingOperator(inner, log)
    op @ torch.ones(6, dtype=torch.float64)
    out = op @ torch.arange(6.0, dtype=torch.float64)
    assert log.replayed == 1 and inner.n_matvecs == 1
    assert torch.allclose(out, inner.matrix @ torch.arange(6.0, dtype=torch.float64))


def test_blocks_share_the_product_sequence(tmp_path):
    space = hesse.ParamSpace(["a.w", "b.w"], [(2,), (4,)])
    base = hesse.DenseOperator(dense().matrix, space=space)
    log = ProductLog()
    op = RecordingOperator(base, log)
    blocks = op.blocks(by="module")
    assert set(blocks) == {"a", "b"} and blocks["b"].shape == (4, 4)
    blocks["b"] @ torch.ones(4, dtype=torch.float64)
    op @ torch.ones(6, dtype=torch.float64)
    assert log.index == 2 and op.tags == base.tags


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    Checkpoint(tmp_path / "ck", {"k": 3})
    with pytest.raises(ValueError, match="different run"):
        Checkpoint(tmp_path / "ck", {"k": 4})
    (tmp_path / "junk").write_bytes(b"\x00\xff")
    with pytest.raises(ValueError, match="not a hesse checkpoint"):
        Checkpoint(tmp_path / "junk", {})


def test_time_budget_is_spent_at_the_mean_rate(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("hesse.analysis._checkpoint.time.monotonic", lambda: clock[0])
    log = ProductLog(max_time=10.0)
    assert log.affordable(50) == 50  # no product yet: no rate to go by
    log.columns, log.seconds = 10, 2.0  # 5 columns per second
    clock[0] = 106.0  # 4 s left
    assert log.affordable(50) == 20 and log.affordable(7) == 7
    clock[0] = 111.0
    assert log.affordable(50) == 0
    with pytest.raises(TimeUp):
        log.product(dense(), torch.ones(6, 1, dtype=torch.float64))
