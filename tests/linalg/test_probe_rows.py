"""Under FSDP the probes and start vectors are drawn block by block, keeping the local rows."""

from types import SimpleNamespace

import pytest
import torch

from hesse.linalg import _util
from hesse.linalg._util import gaussian, generator, rademacher


def _like(D: int, index: torch.Tensor | None):
    shard = None if index is None else SimpleNamespace(index=index)
    return SimpleNamespace(shard=shard, dim=D, device=torch.device("cpu"), dtype=torch.float64)


@pytest.mark.parametrize("draw", [gaussian, rademacher])
@pytest.mark.parametrize(
    ("D", "k", "rows"),
    [(100, 1, 32), (101, 3, 16), (33, 1, 16), (7, 2, 16), (1000, 2, 64), (65, 1, 32)],
)
def test_local_draw_equals_rows_of_the_full_draw(monkeypatch, draw, D, k, rows):
    monkeypatch.setattr(_util, "DRAW_ROWS", rows)
    full = draw(generator(3), D, k, _like(D, None))
    g = torch.Generator().manual_seed(11)
    # two processes' rows, in the scattered order of several parameters' ranges
    perm = torch.randperm(D, generator=g)
    for index in (perm[: D // 2], perm[D // 2 :]):
        gen = generator(3)
        local = draw(gen, len(index), k, _like(D, index))
        torch.testing.assert_close(local, full[index], rtol=0, atol=0)
        # the generator advanced as far as the full draw's did: the next draws agree too
        ref = generator(3)
        draw(ref, D, k, _like(D, None))
        assert torch.equal(torch.rand(4, generator=gen), torch.rand(4, generator=ref))


def test_blocks_stay_small(monkeypatch):
    monkeypatch.setattr(_util, "DRAW_ROWS", 64)
    sizes = []
    real = torch.randn

    def spy(*shape, **kw):
        sizes.append(shape[0])
        return real(*shape, **kw)

    monkeypatch.setattr(torch, "randn", spy)
    gaussian(generator(0), 10, 2, _like(1000, torch.arange(10)))
    assert max(sizes) <= 64 + 7 and sum(sizes) == 1000
