"""examples/optim_digits.py runs and every optimizer in it lowers the loss."""

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "optim_digits.py"


@pytest.mark.slow
def test_the_optim_example_trains_with_every_optimizer(capsys):
    spec = importlib.util.spec_from_file_location("optim_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(epochs=1)
    assert "SophiaG" in capsys.readouterr().out
    for name, row in rows.items():
        assert row["train_loss"] < math.log(10) - 0.3, name  # below chance after one epoch
        assert row["lambda_max"] > 0 and math.isfinite(row["trace"]), name
