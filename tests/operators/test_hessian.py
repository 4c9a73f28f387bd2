"""HessianOperator equals the dense reference Hessian, in both AD modes, on every case."""

import pytest
import torch

import hesse
from cases import ALL, CASES, dense, objective


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("name", ALL)
def test_hessian_operator_matches_reference(name, mode, assert_operator_matches):
    op = hesse.HessianOperator(objective(name), mode=mode)
    assert_operator_matches(op, dense("hessian", name))


@pytest.mark.parametrize("name", ["block_ce", "mlp_mse"])
def test_auto_mode_matches_reference(name, assert_operator_matches):
    op = hesse.HessianOperator(objective(name))
    assert_operator_matches(op, dense("hessian", name))


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


def test_float32_objective_matches_float64_reference_to_float32_tolerance():
    model, data, kw = CASES["mlp_ce"].build()
    op = hesse.HessianOperator(hesse.Objective(model, data, **kw, dtype=torch.float32))
    assert op.dtype == torch.float32
    H = dense("hessian", "mlp_ce")
    V = torch.randn(op.shape[0], 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = (op @ V.float()).double()
    assert ((got - H @ V).norm() / (H.norm() * V.norm())).item() <= 1e-5
    r = hesse.eigs(op, k=2)
    assert r.values.dtype == torch.float64
    want = torch.linalg.eigvalsh(H).flip(0)[:2]
    assert (r.values - want).abs().max().item() <= 1e-4 * want.abs().max().item()


class _WithUnused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used = torch.nn.Linear(3, 2)
        self.unused = torch.nn.Linear(3, 2)  # e.g. a pooler a task head never reads

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_unused_parameters_have_zero_curvature(mode):
    torch.manual_seed(0)
    model = _WithUnused().double()
    data = (torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1]))
    obj = hesse.Objective(model, data, loss=torch.nn.functional.cross_entropy)
    H = hesse.HessianOperator(obj, mode=mode)
    dense = hesse.reference.dense_hessian(obj)
    assert torch.allclose(H.to_dense(), dense, atol=1e-12)
    assert obj.gradient()[obj.space.slices()["unused.weight"]].abs().max() == 0
