import math

import pytest

from example_scripts import load


@pytest.mark.slow
def test_quant_digits_example_runs_and_stays_within_budget(capsys):
    module = load("quant_digits")
    out = module.main(samples=256, budget=20)
    assert set(out) == {"float", "uniform 3-bit", "Hessian"}
    assert out["Hessian"][0] <= 1.07 * out["uniform 3-bit"][0]
    assert all(math.isfinite(loss) and 0 <= acc <= 1 for _, loss, acc in out.values())
    assert "chosen bits" in capsys.readouterr().out
