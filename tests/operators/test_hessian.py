"""HessianOperator equals the dense reference Hessian, in both AD modes, on every case."""

import warnings

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


def _sub_block(kind, name, space, names):
    """The rows and columns of ``names`` in the dense reference of a case."""
    slices = space.slices()
    idx = torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in names])
    return dense(kind, name)[idx][:, idx]


def test_hessian_of_restricted_objective_is_the_dense_sub_block(assert_operator_matches):
    obj = objective("cnn_bn_ce")
    names = ["bn.weight", "bn.bias", "fc.weight"]
    op = hesse.HessianOperator(obj.restrict(names))
    assert_operator_matches(op, _sub_block("hessian", "cnn_bn_ce", obj.space, names))


def test_restrict_by_module_prefix():
    op = hesse.HessianOperator(objective("block_ce"))
    want = _sub_block("hessian", "block_ce", op.space, ["fc1.weight", "fc1.bias"])
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
    model = _WithUnused().double().eval()
    data = (torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1]))
    obj = hesse.Objective(model, data, loss=torch.nn.functional.cross_entropy)
    H = hesse.HessianOperator(obj, mode=mode)
    dense = hesse.reference.dense_hessian(obj)
    assert torch.allclose(H.to_dense(), dense, atol=1e-12)
    assert obj.gradient()[obj.space.slices()["unused.weight"]].abs().max() == 0


# ------------------------------------------------------------------ ops without a double backward


class _Cdist(torch.nn.Module):
    """Distances to fixed centres through ``_cdist_forward``, whose backward has no derivative."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)
        self.register_buffer(
            "centres", torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
        )

    def forward(self, x):
        return -torch.cdist(self.fc(x), self.centres, compute_mode="donot_use_mm_for_euclid_dist")


class _FlashCPU(torch.nn.Module):
    """Self-attention through the fused CPU kernel directly (what SDPA dispatches to)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)

    def forward(self, x):
        h = self.fc(x)[None, None]  # (1, 1, n, 4)
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(h, h, h)[0]
        return out[0, 0, :, :3]


class _Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _OnceDifferentiable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x):
        return _Square.apply(self.fc(x))


@pytest.mark.parametrize(
    ("module", "op"),
    [
        (_Cdist, "_cdist_backward"),
        (_FlashCPU, "_scaled_dot_product_flash_attention_for_cpu_backward"),
        (_OnceDifferentiable, "once_differentiable"),
    ],
)
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_op_without_double_backward_is_named_with_the_fix(module, op, curvature):
    torch.manual_seed(0)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    obj = hesse.Objective(module().double().eval(), (x, y), loss=torch.nn.functional.cross_entropy)
    A = hesse.HessianOperator(obj) if curvature == "hessian" else hesse.GGNOperator(obj)
    with pytest.raises(RuntimeError, match=op) as err:
        A @ torch.ones(obj.dim, dtype=torch.float64)
    message = str(err.value)
    assert type(A).__name__ in message
    assert "double backward" in message and "params=" in message


def test_forward_mode_falls_back_then_names_the_op():
    torch.manual_seed(0)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    obj = hesse.Objective(_Cdist().double().eval(), (x, y), loss=torch.nn.functional.cross_entropy)
    H = hesse.HessianOperator(obj, mode="forward")
    with (
        pytest.warns(UserWarning, match="forward-mode"),
        pytest.raises(RuntimeError, match="_cdist_backward") as err,
    ):
        H @ torch.ones(obj.dim, dtype=torch.float64)
    assert "HessianOperator" in str(err.value) and "params=" in str(err.value)


# ------------------------------------------------------------------ the kept graphs


def test_graphs_that_do_not_fit_warn_once_with_the_size_needed(assert_operator_matches):
    op = hesse.HessianOperator(objective("block_ce"), max_cache_bytes=100)
    v = torch.ones(op.shape[0], dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"need .* for 3 batches.*max_cache_bytes=100") as rec:
        op @ v
    assert len(rec) == 1 and op.cache_bytes == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not on every product
        op @ v
        op @ v
    assert_operator_matches(op, dense("hessian", "block_ce"))


def test_auto_cap_keeps_the_graphs():
    op = hesse.HessianOperator(objective("cnn_bn_ce"))
    assert op.max_cache_bytes == "auto"
    op @ torch.ones(op.shape[0], dtype=torch.float64)
    assert op.cache_bytes > 0


def test_max_cache_bytes_zero_keeps_nothing_and_says_nothing(assert_operator_matches):
    op = hesse.HessianOperator(objective("mlp_ce"), max_cache_bytes=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_operator_matches(op, dense("hessian", "mlp_ce"))
    assert op.cache_bytes == 0


def test_kept_graphs_do_not_count_the_parameters():
    # the second layer's 8 MB weight is saved for the backward to the hidden units, but it is
    # resident anyway; on 2 samples the graph itself holds a few kB of activations
    torch.manual_seed(0)
    model = (
        torch.nn.Sequential(torch.nn.Linear(3, 1000), torch.nn.Tanh(), torch.nn.Linear(1000, 1000))
        .double()
        .eval()
    )
    x, y = torch.randn(2, 3, dtype=torch.float64), torch.tensor([3, 7])
    obj = hesse.Objective(model, (x, y), loss=torch.nn.functional.cross_entropy)
    op = hesse.HessianOperator(obj)
    op @ torch.ones(obj.dim, dtype=torch.float64)
    assert 0 < op.cache_bytes < 1e6


@pytest.mark.parametrize("bad", [-1, 1.5, "big", None])
def test_max_cache_bytes_is_checked(bad):
    with pytest.raises(ValueError, match="max_cache_bytes"):
        hesse.HessianOperator(objective("mlp_ce"), max_cache_bytes=bad)
