"""examples/influence_logistic.py runs and shows what its docstring says."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "influence_logistic.py"


@pytest.mark.slow
def test_influence_logistic_example():
    spec = importlib.util.spec_from_file_location("influence_logistic", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(n_train=200, n_checked=2)
    for predicted, actual in out["pairs"]:
        assert predicted > 0 and predicted == pytest.approx(actual, rel=0.3)
    before, after = out["unlearn"]
    assert after < 0.05 * before
    hg, fd = out["hypergradient"]
    assert hg == pytest.approx(fd, rel=1e-3)
