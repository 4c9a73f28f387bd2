"""``--shard``: FSDP2 under torchrun; outside it, a usage error that says how to launch."""

import pytest
import torch
from torch import nn

from hesse.cli import build_parser
from hesse.cli._inputs import UsageError
from hesse.cli._problem import Problem, sharded


def test_shard_outside_torchrun_is_a_usage_error_naming_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    batches = [(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))]
    problem = Problem("m", nn.Linear(3, 2), batches, None, None, None, None, None, None, {})
    with pytest.raises(UsageError, match="launch with torchrun.*--shard"):
        sharded(problem)


def test_the_commands_take_shard():
    args = build_parser().parse_args(["eigs", "--demo", "digits", "--shard"])
    assert args.shard is True
    assert build_parser().parse_args(["trace", "--demo", "digits"]).shard is False
