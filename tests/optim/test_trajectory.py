import pytest
import torch
import torch.nn.functional as F

from hesse.optim import TrajectoryLoss


def test_trajectory_loss_is_the_tempered_kl_to_the_outputs_lag_epochs_ago():
    gen = torch.Generator().manual_seed(0)
    traj = TrajectoryLoss(6, 4, lag=2, temperature=2.0, weight=0.5)
    idx = torch.tensor([4, 1, 3])
    history = [torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    assert traj(history[0], idx, epoch=0).item() == 0.0  # nothing from epoch -2
    assert traj(history[1], idx, epoch=1).item() == 0.0
    now = history[2].clone().requires_grad_(True)
    got = traj(now, idx, epoch=2)
    p_past = F.softmax(history[0] / 2, -1)
    want = 0.5 * 4 * (p_past * (p_past.log() - F.log_softmax(now / 2, -1))).sum(-1).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    got.backward()
    assert now.grad.abs().sum() > 0


def test_samples_not_seen_lag_epochs_ago_add_nothing():
    traj = TrajectoryLoss(4, 3, lag=1)
    a = torch.randn(2, 3)
    traj(a, torch.tensor([0, 1]), epoch=0)
    assert traj(torch.randn(2, 3), torch.tensor([2, 3]), epoch=1).item() == 0.0
    state = traj.state_dict()
    fresh = TrajectoryLoss(4, 3, lag=1)
    fresh.load_state_dict(state)
    b = torch.randn(2, 3)
    assert fresh(b, torch.tensor([0, 1]), epoch=1).item() == traj(b, torch.tensor([0, 1]), 1).item()


def test_wrong_shapes_are_refused():
    with pytest.raises(ValueError, match="expected logits of shape"):
        TrajectoryLoss(4, 3)(torch.randn(2, 5), torch.tensor([0, 1]), epoch=0)
