"""HessianOperator equals the dense reference Hessian, in both AD modes, on every case."""

import pytest
import torch

import hesse
from cases import ALL, dense, objective


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("name", ALL)
def test_hessian_operator_matches_reference(name, mode, assert_operator_matches):
    op = hesse.HessianOperator(objective(name), mode=mode)
    assert_operator_matches(op, dense("hessian", name))


def test_auto_mode_matches_reference(assert_operator_matches):
    op = hesse.HessianOperator(objective("block_ce"))
    assert_operator_matches(op, dense("hessian", "block_ce"))


def test_hessian_tags_dtype_device_space():
    obj = objective("mlp_ce")
    op = hesse.HessianOperator(obj)
    assert "symmetric" in op.tags
    assert "psd" not in op.tags
    assert op.dtype == torch.float64
    assert op.device == torch.device("cpu")
    assert op.space.names == obj.space.names
    assert op.n_matvecs == 0


def test_hessian_of_restricted_objective_is_the_dense_sub_block(assert_operator_matches):
    obj = objective("cnn_bn_ce")
    names = ["bn.weight", "bn.bias", "fc.weight"]
    slices = obj.space.slices()
    idx = torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in names])
    op = hesse.HessianOperator(obj.restrict(names))
    assert_operator_matches(op, dense("hessian", "cnn_bn_ce")[idx][:, idx])


def test_restrict_by_module_prefix():
    op = hesse.HessianOperator(objective("block_ce"))
    slices = op.space.slices()
    idx = torch.cat(
        [torch.arange(slices[n].start, slices[n].stop) for n in ["fc1.weight", "fc1.bias"]]
    )
    want = dense("hessian", "block_ce")[idx][:, idx]
    got = op.restrict(["fc1"]).to_dense()
    assert ((got - want).norm() / want.norm()).item() <= 1e-10


def test_matvec_counts_columns():
    op = hesse.HessianOperator(objective("mlp_ce"))
    op @ torch.ones(op.shape[0], dtype=torch.float64)
    op @ torch.ones(op.shape[0], 5, dtype=torch.float64)
    assert op.n_matvecs == 6
