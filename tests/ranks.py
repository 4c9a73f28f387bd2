"""Run a function on several gloo processes and collect what each returns (for tests)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_ranks(work: Callable[[int], object], folder: Path, world: int = 2, timeout_s: int = 240):
    """``[work(0), ..., work(world - 1)]``, each run in its own process of one gloo group.

    ``work`` must be a module-level function (it is pickled into the processes). A process
    that does not finish within ``timeout_s`` (a deadlock) fails the test.
    """
    ctx = mp.spawn(_entry, args=(work, str(folder), world), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"distributed workers did not finish within {timeout_s} s (deadlock?)")
    return [torch.load(Path(folder) / f"rank{rank}.pt") for rank in range(world)]


def _entry(rank: int, work: Callable, folder: str, world: int) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world
    )
    try:
        torch.save(work(rank), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
