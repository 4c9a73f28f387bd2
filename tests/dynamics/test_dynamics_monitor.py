"""SharpnessMonitor: equals a cold eigensolve, warm starts save products, JSONL, hooks."""

import json
import types

import pytest
import torch
from dynamics_problems import data, dense_hessian, mlp, objective
from torch import nn

import hesse
from hesse.dynamics import SharpnessMonitor, read_jsonl


def _train(model, mon, steps, lr=0.05, momentum=0.0):
    x, y = data()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    for t in range(steps):
        mon.step(t, lr=lr, momentum=momentum)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def test_monitor_equals_a_cold_eigs_at_the_same_step():
    model = mlp()
    mon = SharpnessMonitor(model, [data()], nn.functional.mse_loss, every=5, k=2, tol=1e-10)
    x, y = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for t in range(21):
        rec = mon.step(t, lr=0.3)
        if rec is not None:
            dense = dense_hessian(objective(model))
            want = torch.linalg.eigvalsh(dense).flip(0)[:2]
            cold = hesse.eigs(hesse.HessianOperator(objective(model)), 2, tol=1e-10)
            assert rec.eigenvalues == pytest.approx(want.tolist(), rel=1e-8)
            assert rec.eigenvalues == pytest.approx(cold.values.tolist(), rel=1e-8)
            assert rec.loss == pytest.approx(float(objective(model).value()), rel=1e-12)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert [r.step for r in mon.history] == [0, 5, 10, 15, 20]
    assert all(r.threshold == pytest.approx(2 / 0.3) for r in mon.history)


def test_warm_starts_use_fewer_products_than_cold_starts():
    counts = {}
    for warm in (True, False):
        model = mlp(width=10)
        mon = SharpnessMonitor(model, [data()], nn.functional.mse_loss, every=2, warm=warm)
        _train(model, mon, 40)
        counts[warm] = [r.n_matvecs for r in mon.history]
    # the first check starts cold in both runs; every later one from the last vector plus a
    # random one of the same norm (so that it cannot certify a stale value), which saves the
    # products that resolve the old direction: 309 against 346 here (d = 83)
    assert counts[True][0] == counts[False][0]
    assert sum(counts[True][1:]) < 0.93 * sum(counts[False][1:])


def test_jsonl_holds_every_check_and_a_torn_line_is_skipped(tmp_path):
    out = tmp_path / "runs" / "sharpness.jsonl"
    model = mlp()
    mon = SharpnessMonitor(model, [data()], nn.functional.mse_loss, every=3, trace=True, out=out)
    _train(model, mon, 7, momentum=0.9)
    rows = read_jsonl(out)
    assert [r["step"] for r in rows] == [0, 3, 6]
    assert rows[-1]["lambda_max"] == mon.history[-1].lambda_max
    assert rows[0]["threshold"] == pytest.approx(3.8 / 0.05)
    assert all(r["trace"] is not None and r["trace_stderr"] >= 0 for r in rows)
    with open(out, "a") as f:
        f.write('{"step": 9, "lambda')  # a crash in the middle of a write
    assert len(read_jsonl(out)) == 3
    json.loads(out.read_text().splitlines()[0])


def test_trace_of_the_monitor_is_unbiased_for_the_dense_trace():
    model = mlp()
    mon = SharpnessMonitor(model, [data()], nn.functional.mse_loss, every=1, trace=True,
                           trace_budget=90)  # fmt: skip
    rec = mon.step(0, lr=0.1)
    exact = float(torch.trace(dense_hessian(objective(model))))
    assert abs(rec.trace - exact) <= 4 * rec.trace_stderr + 1e-9
    assert rec.trace_matvecs == 90


def test_train_mode_flags_are_restored_and_dropout_is_off_during_a_check():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3)).double().train()
    model[2].eval()  # a mixed state must come back as it was
    mon = SharpnessMonitor(model, [data()], nn.functional.mse_loss, every=1)
    a = mon.step(0).lambda_max
    b = mon.step(1).lambda_max
    assert a == pytest.approx(b, rel=1e-6)  # deterministic: dropout was off
    assert [m.training for m in model.modules()] == [True, True, True, False]


def test_lightning_style_hook_reads_step_and_lr_from_the_trainer():
    model = mlp()
    mon = SharpnessMonitor(model, [data()], nn.functional.mse_loss, every=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    hook = mon.callback
    for step in (10, 11, 20):
        trainer = types.SimpleNamespace(global_step=step, optimizers=[opt])
        hook.on_train_batch_end(trainer, model, None, None, 0)
    assert [r.step for r in mon.history] == [10, 20]
    assert mon.history[0].threshold == pytest.approx(3.0 / 0.2)
    assert hook(30, lr=0.1).step == 30


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="every and k"):
        SharpnessMonitor(mlp(), [data()], nn.functional.mse_loss, every=0)
    with pytest.raises(ValueError, match="curvature"):
        SharpnessMonitor(mlp(), [data()], nn.functional.mse_loss, curvature="kfac")
