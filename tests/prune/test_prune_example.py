"""examples/prune_digits.py runs and says what its docstring says."""

import pytest

from example_scripts import load


@pytest.mark.slow
def test_prune_digits_example(capsys):
    module = load("prune_digits")
    losses = module.main(0.7)
    assert set(losses) == {"magnitude", "obd", "mfac", "mfac x4", "layer_obs"}
    assert losses["mfac"] < losses["magnitude"]  # measured 0.198 against 0.308
    assert "damping 0.01 x mean diag" in capsys.readouterr().out
