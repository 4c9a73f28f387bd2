"""Saliencies and OBS updates against dense references on a small trained MLP."""

import pytest
import torch
from prune_cases import loss_of, trained_mlp

from hesse import reference
from hesse.prune import collect_gradients, prune, saliency
from hesse.prune.saliency import curvature_for

DENSE = {"hessian": reference.dense_hessian, "ggn": reference.dense_ggn}


@pytest.fixture(scope="module")
def mlp():
    return trained_mlp()


def test_gradients_average_to_the_gradient_and_give_the_empirical_fisher(mlp):
    _, _, obj = mlp
    G = collect_gradients(obj, m=None)
    assert G.shape == (120, obj.dim)
    torch.testing.assert_close(G.mean(0), obj.gradient(), rtol=0, atol=1e-12)
    torch.testing.assert_close(G.T @ G / 120, reference.dense_fisher(obj), rtol=0, atol=1e-12)


def test_gradients_of_chunks_and_seeded_draws(mlp):
    _, data, obj = mlp
    G = collect_gradients(obj, m=None, batch_size=32)  # 70 -> 32, 32, 6; 50 -> 32, 18
    assert G.shape[0] == 5
    torch.testing.assert_close(G[2], collect_gradients(obj, m=None)[64:70].mean(0))
    a, b = collect_gradients(obj, m=7, seed=3), collect_gradients(obj, m=7, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, collect_gradients(obj, m=7, seed=4))
    with pytest.raises(ValueError, match="only 120 samples"):
        collect_gradients(obj, m=121)


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "fisher"])
def test_obd_is_half_the_damped_diagonal_times_w_squared(mlp, curvature):
    _, _, obj = mlp
    C = DENSE[curvature](obj) if curvature in DENSE else reference.dense_fisher(obj)
    s = saliency(obj, "obd", curvature=curvature, m=None, damping=1e-3)
    assert s.damping == pytest.approx(1e-3 * C.diagonal().abs().mean().item(), rel=1e-12)
    w = obj.space.join(obj.params)
    torch.testing.assert_close(s.flat, 0.5 * (C.diagonal() + s.damping) * w**2, rtol=1e-10, atol=0)
    assert s.scores["0.weight"].shape == (12, 8)


def test_obs_saliency_is_w_squared_over_twice_the_inverse_diagonal(mlp):
    _, _, obj = mlp
    C = reference.dense_ggn(obj)
    s = saliency(obj, "obs", curvature="ggn", damping=1e-2)
    Hinv = torch.linalg.inv(C + s.damping * torch.eye(obj.dim, dtype=C.dtype))
    w = obj.space.join(obj.params)
    torch.testing.assert_close(s.flat, w**2 / (2 * Hinv.diagonal()), rtol=1e-9, atol=0)


def test_mfac_equals_dense_obs_with_the_same_gradients(mlp):
    _, _, obj = mlp
    dense = saliency(obj, "obs", curvature="fisher", m=None)
    woodbury = saliency(obj, "mfac", m=None, fisher_block=None)
    assert woodbury.damping == pytest.approx(dense.damping, rel=1e-12)
    torch.testing.assert_close(woodbury.flat, dense.flat, rtol=1e-8, atol=0)


def _dense_of(H):
    return H.cholesky @ H.cholesky.T


def test_single_weight_obs_update_changes_the_quadratic_model_by_the_saliency(mlp):
    _, _, obj = mlp
    H = curvature_for(obj, "obs", "ggn", 1e-2, None, 1, None, 0)
    A, w = _dense_of(H), obj.space.join(obj.params)
    s = saliency(obj, "obs", curvature="ggn", damping=1e-2).flat
    for q in (0, 17, obj.dim - 1):
        delta, predicted = H.obs_update(w, torch.tensor([q]))
        assert (w + delta)[q].abs() < 1e-12
        assert 0.5 * delta @ A @ delta == pytest.approx(float(s[q]), rel=1e-9)
        assert predicted == pytest.approx(float(s[q]), rel=1e-9)


def test_joint_obs_update_is_the_constrained_minimum(mlp):
    _, _, obj = mlp
    H = curvature_for(obj, "obs", "ggn", 1e-2, None, 1, None, 0)
    A, w = _dense_of(H), obj.space.join(obj.params)
    Q = torch.tensor([1, 5, 30, 60, 100])
    delta, predicted = H.obs_update(w, Q)
    rest = torch.ones(obj.dim, dtype=torch.bool)
    rest[Q] = False
    torch.testing.assert_close(delta[Q], -w[Q], rtol=1e-10, atol=1e-12)
    assert (A @ delta)[rest].abs().max() < 1e-10  # stationary in the weights that may move
    assert 0.5 * delta @ A @ delta == pytest.approx(predicted, rel=1e-9)


def test_woodbury_joint_update_equals_the_dense_one_with_the_same_gradients(mlp):
    _, _, obj = mlp
    dense = curvature_for(obj, "obs", "fisher", 1e-2, None, 1, None, 0)
    woodbury = curvature_for(obj, "mfac", "fisher", 1e-2, None, 1, None, 0, None)
    w = obj.space.join(obj.params)
    Q = torch.tensor([2, 9, 44, 70, 71, 120])
    (a, pa), (b, pb) = dense.obs_update(w, Q), woodbury.obs_update(w, Q)
    torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-12)
    assert pb == pytest.approx(pa, rel=1e-8)


def test_blockwise_mfac_is_obs_with_the_block_diagonal_fisher(mlp):
    _, _, obj = mlp
    G = collect_gradients(obj, m=None)
    H = curvature_for(obj, "mfac", "fisher", 1e-2, None, 1, None, 0, 40)
    A = torch.zeros(obj.dim, obj.dim, dtype=G.dtype)
    for part, F in H.woodbury:  # each block damped relative to its own mean diagonal
        Gb = G[:, part]
        lam = 1e-2 * float((Gb**2).mean(0).mean())
        assert F.damping == pytest.approx(lam, rel=1e-12)
        A[part, part] = Gb.T @ Gb / G.shape[0] + lam * torch.eye(Gb.shape[1], dtype=G.dtype)
    assert [p.stop for p, _ in H.woodbury] == [40, 80, 120, 147]
    w, Q = obj.space.join(obj.params), torch.tensor([3, 41, 42, 120, 140])
    Ainv = torch.linalg.inv(A)
    torch.testing.assert_close(H.inverse_diag(), Ainv.diagonal(), rtol=1e-9, atol=0)
    delta, predicted = H.obs_update(w, Q)
    want = -Ainv[:, Q] @ torch.linalg.solve(Ainv[Q][:, Q], w[Q])
    torch.testing.assert_close(delta, want, rtol=1e-8, atol=1e-12)
    assert predicted == pytest.approx(float(0.5 * want @ A @ want), rel=1e-8)


def test_indefinite_hessian_gets_the_damping_it_needs_and_it_is_reported(mlp):
    model, data, obj = mlp
    C = reference.dense_hessian(obj)
    assert torch.linalg.eigvalsh(C)[0] < -1e-3  # a trained net is not at a minimum
    plan = prune(obj, 0.7, "obs", curvature="hessian", damping=1e-8)
    assert plan.relative_damping[0] > 1e-8
    eye = torch.eye(obj.dim, dtype=C.dtype)
    assert torch.linalg.eigvalsh(C + plan.damping[0] * eye)[0] > 0
    assert torch.isfinite(torch.tensor(loss_of(plan.apply(model), data)))


def test_second_order_beats_magnitude_at_70_percent(mlp):
    model, data, obj = mlp
    magnitude = loss_of(prune(obj, 0.7, "magnitude").apply(model), data)
    for method in ("obs", "mfac"):  # one Fisher block: measured 0.481; blocks of 128: 0.545
        plan = prune(obj, 0.7, method, m=None, fisher_block=None)
        assert loss_of(plan.apply(model), data) < magnitude


def test_bad_saliency_requests(mlp):
    _, _, obj = mlp
    with pytest.raises(ValueError, match="method must be one of"):
        saliency(obj, "taylor")
    with pytest.raises(ValueError, match="curvature must be one of"):
        saliency(obj, "obd", curvature="shampoo")
    with pytest.raises(ValueError, match="damping must be > 0"):
        saliency(obj, "obs", damping=0.0)
    with pytest.raises(ValueError, match="empirical Fisher"):
        saliency(obj, "mfac", curvature="ggn")
