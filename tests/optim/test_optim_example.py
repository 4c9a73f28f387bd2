"""examples/optim_digits.py runs and every optimizer in it lowers the loss."""

import math

import pytest

from example_scripts import load


@pytest.mark.slow
def test_the_optim_example_trains_with_every_optimizer(capsys):
    module = load("optim_digits")
    rows = module.main(epochs=1)
    assert "SophiaG" in capsys.readouterr().out
    for name, row in rows.items():
        assert row["train_loss"] < math.log(10) - 0.3, name  # below chance after one epoch
        assert row["lambda_max"] > 0 and math.isfinite(row["trace"]), name
