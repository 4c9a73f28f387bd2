"""examples/influence_logistic.py runs and shows what its docstring says."""

import pytest

from example_scripts import load


@pytest.mark.slow
def test_influence_logistic_example():
    module = load("influence_logistic")
    out = module.main(n_train=200, n_checked=2)
    for predicted, actual in out["pairs"]:
        assert predicted > 0 and predicted == pytest.approx(actual, rel=0.3)
    before, after = out["unlearn"]
    assert after < 0.05 * before
    hg, fd = out["hypergradient"]
    assert hg == pytest.approx(fd, rel=1e-3)
