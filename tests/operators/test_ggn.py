"""GGNOperator equals the dense reference GGN on every case built with ``loss=``."""

import pytest

import hesse
from cases import WITH_LOSS, dense, objective


@pytest.mark.parametrize("name", WITH_LOSS)
def test_ggn_operator_matches_reference(name, assert_operator_matches):
    op = hesse.GGNOperator(objective(name))
    assert_operator_matches(op, dense("ggn", name))


@pytest.mark.parametrize("name", ["mlp_ce", "mlp_mse"])
def test_ggn_is_tagged_psd(name):
    assert {"symmetric", "psd"} <= hesse.GGNOperator(objective(name)).tags


def test_ggn_needs_an_objective_built_with_loss():
    with pytest.raises((ValueError, TypeError), match="(?i)loss"):
        hesse.GGNOperator(objective("seq_lossfn"))
