"""diagonal: unbiased over seeds, with a roughly honest standard error."""

import torch

import hesse
from cases import DT, objective, sym_matrix

D = 40
S = 300


def test_diagonal_is_unbiased_and_stderr_is_honest():
    A = sym_matrix(torch.randn(D, generator=torch.Generator().manual_seed(5), dtype=DT), seed=5)
    results = [hesse.diagonal(A, budget=20, seed=s) for s in range(S)]
    values = torch.stack([r.value.to(DT) for r in results])
    stderrs = torch.stack([r.stderr.to(DT) for r in results])
    assert values.shape == (S, D) and stderrs.shape == (S, D)
    assert all(r.n_matvecs <= 20 for r in results)
    spread = values.std(0)
    assert (spread > 0).all()
    # Mean over 300 seeds within 4.5 standard errors of diag(A), entry by entry (40 entries).
    z = (values.mean(0) - A.diagonal()) / (spread / S**0.5)
    assert z.abs().max().item() < 4.5, z
    # Honest stderr: mean reported variance vs variance across seeds, averaged over entries.
    ratio = (stderrs**2).mean(0) / spread**2
    assert 0.6 < ratio.mean().item() < 1.6, ratio.mean()


def test_diagonal_of_a_diagonal_matrix_is_exact():
    d = torch.linspace(-1, 2, D, dtype=DT)
    r = hesse.diagonal(torch.diag(d), budget=4, seed=0)
    assert torch.allclose(r.value.to(DT), d, rtol=1e-12, atol=1e-12)


def test_diagonal_of_model_hessian_has_the_right_shape():
    op = hesse.HessianOperator(objective("mlp_ce"))
    r = hesse.diagonal(op, budget=8, seed=0)
    assert r.value.shape == (op.shape[0],) and r.stderr.shape == (op.shape[0],)
    assert r.n_matvecs == op.n_matvecs
