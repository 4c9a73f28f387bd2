"""``prune(..., curvature="kfac" | "ekfac")``: OBD and OBS with Kronecker blocks (LLM Surgeon).

The saliencies and the OBS update are exact for ``K + lambda I`` block by block: they equal the
dense formulas applied to ``KFACOperator(obj).to_dense()`` (float64). End to end, a one-shot
KFAC-OBS prune of a trained MLP is measured on held-out data.
"""

import pytest
import torch
import torch.nn.functional as F
from prune_cases import loss_of, trained_mlp
from torch import nn

from hesse import EKFACOperator, KFACOperator, Objective
from hesse.prune import prune, saliency
from hesse.prune._curvature import damped
from hesse.prune._gradients import objective_at

OPERATORS = {"kfac": KFACOperator, "ekfac": EKFACOperator}


def dense_damped(obj: Objective, kind: str, rho: float = 1e-2, alive=None) -> torch.Tensor:
    """``K + lambda I``, lambda = rho x the mean diagonal of K over the alive weights."""
    K = OPERATORS[kind](obj).to_dense()
    alive = torch.ones(obj.dim, dtype=torch.bool) if alive is None else alive
    lam = rho * float(K.diagonal()[alive].mean())
    return K + lam * torch.eye(obj.dim, dtype=K.dtype)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
@pytest.mark.parametrize("biases", [False, True])
def test_saliencies_equal_the_dense_formulas_on_the_kronecker_matrix(kind, biases):
    _, _, obj = trained_mlp()
    obj = obj if biases else obj.restrict(["0.weight", "2.weight"])  # biases: a last column
    H = dense_damped(obj, kind)
    w = obj.space.join(obj.params).detach()
    obs = w**2 / (2 * torch.linalg.inv(H).diagonal())
    obd = 0.5 * H.diagonal() * w**2
    for method, expected in (("obs", obs), ("obd", obd)):
        s = saliency(obj, method, curvature=kind)
        assert s.curvature == kind
        assert torch.allclose(s.flat, expected, rtol=1e-8, atol=0), method


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_the_obs_update_is_the_dense_constrained_optimum(kind):
    """Zeroing Q with the weights pruned before (D) held at zero: the dense OBS over Q and D."""
    _, _, obj = trained_mlp()
    obj = obj.restrict(["0.weight", "2.weight"])
    w = obj.space.join(obj.params).detach().clone()
    gen = torch.Generator().manual_seed(1)
    order = torch.randperm(obj.dim, generator=gen)
    dead, Q = order[:30], order[30:70]
    w[dead] = 0.0
    alive = torch.ones(obj.dim, dtype=torch.bool)
    alive[dead] = False
    at = objective_at(obj, obj.space.split(w))  # the curvature at the pruned weights
    delta, predicted = damped(at, kind, 1e-2, form="dense", alive=alive).obs_update(w, Q)
    Hinv = torch.linalg.inv(dense_damped(at, kind, alive=alive))
    P = torch.cat([Q, dead])
    coeff = torch.linalg.solve(Hinv[P][:, P], w[P])
    expected = -(Hinv[:, P] @ coeff)
    assert torch.allclose(delta, expected, rtol=1e-7, atol=1e-9 * float(expected.abs().max()))
    assert predicted == pytest.approx(float(0.5 * (w[P] @ coeff)), rel=1e-8)
    assert torch.equal((w + delta)[P], torch.zeros(len(P), dtype=w.dtype))


def held_out_task():
    """A weight-decayed 8-16-3 tanh MLP; (model, train, held-out), 400 + 400 samples."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(800, 8, generator=gen, dtype=torch.float64)
    y = (X[:, :2].sum(1) > 0).long() + (X[:, 2] > 0.5).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(X[:400]), y[:400]).backward()
        opt.step()
    return model.eval(), [(X[:400], y[:400])], [(X[400:], y[400:])]


def test_one_shot_kfac_obs_prunes_half_and_beats_magnitude_on_held_out_data():
    """Half the weights of a trained MLP, one shot, measured on 400 held-out samples.

    Losses (train / held-out): unpruned 0.024 / 0.314; magnitude 0.173 / 0.398; dense
    GGN-OBS 0.102 / 0.334; KFAC-OBS 0.069 / 0.276; EKFAC-OBS 0.069 / 0.273.
    """
    model, train, held = held_out_task()
    obj = Objective(model, train, loss=F.cross_entropy)
    plan = prune(obj, 0.5, "obs", curvature="kfac")
    pruned = plan.apply(model)
    magnitude = prune(obj, 0.5, "magnitude").apply(model)
    assert plan.curvature == "kfac" and plan.removed_params == 88 == plan.total_params // 2
    assert int((pruned[0].weight == 0).sum() + (pruned[2].weight == 0).sum()) == 88
    assert loss_of(pruned, held) < 0.3 < loss_of(magnitude, held)
    assert loss_of(pruned, train) < 0.5 * loss_of(magnitude, train)
    assert plan.predicted[0] > 0


def test_mfac_refuses_the_kronecker_factors():
    _, _, obj = trained_mlp()
    with pytest.raises(ValueError, match="method='obs' or 'obd'"):
        prune(obj, 0.5, "mfac", curvature="kfac")
