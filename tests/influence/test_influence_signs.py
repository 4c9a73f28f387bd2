"""The sign and the peer factors of hesse.influence's module docstring, on a convex problem.

Each peer's score is written from its paper's formula (no peer installed); hesse's scores
must equal it times the factor the docstring gives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from influence_problems import DT, blobs, fit, mean_loss, trained

from hesse.influence import influence

LAM = 0.1
C = 3


def setup():
    model, x, y, theta = trained(n=40, lam=LAM)
    xq, yq = blobs(5, seed=9)
    H = torch.func.hessian(lambda t: mean_loss(t, x, y, C))(theta) + LAM * torch.eye(12, dtype=DT)

    def loss_grads(xs, ys):
        return torch.stack(
            [
                torch.func.grad(mean_loss)(theta, a[None], b[None], C)
                for a, b in zip(xs, ys, strict=True)
            ]
        )

    def margin(t, a, b):
        z = a @ t[: C * 3].reshape(C, -1).T + t[C * 3 :]
        others = torch.cat([z[:b], z[b + 1 :]])
        return z[b] - torch.logsumexp(others, 0)

    def margin_grads(xs, ys):
        return torch.stack(
            [torch.func.grad(margin)(theta, a, b) for a, b in zip(xs, ys, strict=True)]
        )

    p_q = F.softmax(model(xq), 1).gather(1, yq[:, None]).squeeze(1).detach()
    return model, x, y, theta, xq, yq, H, loss_grads, margin_grads, p_q


def test_peer_factors_and_sign():
    model, x, y, theta, xq, yq, H, loss_grads, margin_grads, p_q = setup()
    n = len(y)
    G, Gq, Mq = loss_grads(x, y), loss_grads(xq, yq), margin_grads(xq, yq)
    r = influence(model, [(x, y)], [(xq, yq)], F.cross_entropy, ihvp="exact", damping=LAM)
    # Koh & Liang's I_up,loss = -g_q^T H^-1 g_i; hesse = -1/n times it
    koh = -Gq @ torch.linalg.solve(H, G.T)
    assert torch.allclose(r.scores, -koh / n, rtol=1e-10, atol=1e-14)
    # kronfluence: ∇f_q^T (H + λ)^-1 g_i; f = the loss: 1/n; f = the margin: -(1-p_q)/n;
    # f = minus the margin (its examples' -margins.sum()): +(1-p_q)/n
    kron_loss = Gq @ torch.linalg.solve(H, G.T)
    kron_margin = Mq @ torch.linalg.solve(H, G.T)
    factor = ((1 - p_q) / n)[:, None]
    assert torch.allclose(r.scores, kron_loss / n, rtol=1e-10, atol=1e-14)
    assert torch.allclose(r.scores, -factor * kron_margin, rtol=1e-9, atol=1e-14)
    assert torch.allclose(r.scores, factor * (-Mq) @ torch.linalg.solve(H, G.T), rtol=1e-9)
    # TRAK with hesse's curvature in its place (the empirical Fisher of the loss, Φ = G):
    # ∇m_q^T (Φ^T Φ + nλ I)^-1 ∇m_i (1 - p_i) = -∇m_q^T (...)^-1 g_i; hesse = (1 - p_q) times it
    w = influence(model, [(x, y)], [(xq, yq)], F.cross_entropy, ihvp="woodbury", damping=LAM)
    trak = -Mq @ torch.linalg.solve(G.T @ G + n * LAM * torch.eye(12, dtype=DT), G.T)
    assert torch.allclose(w.scores, (1 - p_q)[:, None] * trak, rtol=1e-9, atol=1e-14)


def test_a_training_point_helps_its_own_loss():
    model, x, y, theta = trained(n=40, lam=LAM)
    r = influence(model, [(x, y)], [(x, y)], F.cross_entropy, ihvp="exact", damping=LAM)
    self_scores = r.scores.diagonal()
    assert (self_scores > 0).all()  # positive = helpful: removing it raises its own loss
    for i in (0, 7, 23):  # and leave-one-out retraining agrees in sign and size
        keep = torch.ones(40, dtype=torch.bool)
        keep[i] = False
        theta_i = fit(x[keep], y[keep], C, LAM, start=theta)
        change = mean_loss(theta_i, x[i : i + 1], y[i : i + 1], C) - mean_loss(
            theta, x[i : i + 1], y[i : i + 1], C
        )
        assert change > 0 and abs(float(change) / float(self_scores[i]) - 1) < 0.3
