r"""``influence(ihvp="projected")``: TRAK/LoGra-style scores in a seeded random subspace.

Against the dense formula :math:`\\frac1W (P g_q)^\\top (P A P^\\top + \\lambda I)^{-1} P g_i` with
:math:`P` from ``projection_matrix`` (float64), on a small trained MLP classifier.
"""

import pytest
import torch
import torch.nn.functional as F
from test_influence_kfac import classifier, sample_gradients

from hesse import Objective, reference
from hesse.influence import IHVP_METHODS, influence
from hesse.influence import _projected as proj

DT = torch.float64


def dense_projected(model, train, query, A, k, damping, kind="rademacher", seed=0):
    Gt, Gq = sample_gradients(model, train), sample_gradients(model, query)
    P = proj.projection_matrix(Gt.shape[1], k, kind, seed)
    M = P @ A @ P.T + damping * torch.eye(k, dtype=DT)
    return (P @ Gq.T).T @ torch.linalg.solve(M, P @ Gt.T) / Gt.shape[0]


def test_projected_is_offered():
    assert "projected" in IHVP_METHODS


@pytest.mark.parametrize(("curvature", "kind"), [("fisher", "rademacher"), ("ggn", "gaussian")])
def test_scores_equal_the_dense_projected_formula(curvature, kind):
    model, train, query = classifier()
    k, damping = 20, 1e-3
    r = influence(
        model, train, query, F.cross_entropy, ihvp="projected", curvature=curvature,
        projection_dim=k, projection=kind, damping=damping, seed=3,
    )  # fmt: skip
    obj = Objective(model, train, loss=F.cross_entropy)
    Gt = sample_gradients(model, train)
    A = Gt.T @ Gt / Gt.shape[0] if curvature == "fisher" else reference.dense_ggn(obj)
    expected = dense_projected(model, train, query, A, k, damping, kind, seed=3)
    assert torch.allclose(r.scores, expected, rtol=1e-8, atol=1e-9 * float(expected.abs().max()))
    assert r.ihvp == "projected" and r.curvature == curvature and r.converged
    assert r.inverse.n_matvecs == (k if curvature == "ggn" else 0)
    assert r.inverse.lam_min > 0 and r.memory["projected_gradients"] == (60 + 8) * k * 8


def test_blocks_make_the_same_projection_as_the_dense_matrix(monkeypatch):
    monkeypatch.setattr(proj, "BLOCK", 7)
    G = torch.randn(5, 30, generator=torch.Generator().manual_seed(0), dtype=DT)
    P = proj.projection_matrix(30, 4, "rademacher", seed=1)
    assert P.shape == (4, 30) and set(P.abs().flatten().tolist()) == {0.5}
    assert not torch.equal(P[:, :7], P[:, 7:14])  # each block has its own seed
    assert torch.allclose(proj.project(G, 4, "rademacher", 1), G @ P.T, atol=1e-12)
    Y = torch.randn(3, 4, dtype=DT)
    assert torch.allclose(proj.lift(Y, 30, "rademacher", 1), Y @ P, atol=1e-12)


def test_checkpoints_average_the_scores_of_each_model():
    model, train, query = classifier()
    other, _, _ = classifier(seed=1)
    kw = {"ihvp": "projected", "projection_dim": 16, "damping": 1e-3}
    a = influence(model, train, query, F.cross_entropy, **kw)
    b = influence(other, train, query, F.cross_entropy, **kw)
    both = influence(
        model, train, query, F.cross_entropy, checkpoints=[model, other.state_dict()], **kw
    )
    assert torch.allclose(both.scores, (a.scores + b.scores) / 2, rtol=1e-10, atol=1e-14)


def test_errors_name_the_fix():
    model, train, query = classifier(n=10)
    with pytest.raises(ValueError, match="singular once damped.*damping > 0"):
        influence(model, train, query, F.cross_entropy, ihvp="projected", projection_dim=20)
    with pytest.raises(ValueError, match="curvature='fisher'.*or ihvp='cg'"):
        influence(model, train, query, F.cross_entropy, ihvp="projected", curvature="hessian")
    with pytest.raises(ValueError, match="checkpoints= is for ihvp='projected'"):
        influence(model, train, query, F.cross_entropy, checkpoints=[model])
    with pytest.raises(ValueError, match="kind must be one of"):
        influence(model, train, query, F.cross_entropy, ihvp="projected", projection="sparse")


def test_the_cli_runs_projected_influence(tmp_path):
    from test_influence_cli import run

    status, doc = run(tmp_path, "--query", "0:2", "--ihvp", "projected", "--projection-dim", "8")
    info = doc["results"]["influence"]
    assert status == 0 and info["ihvp"] == "projected" and info["curvature"] == "fisher"
    assert len(doc["results"]["scores"][0]) == 48 and info["memory"]["projected_gradients"] > 0
