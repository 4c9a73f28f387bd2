import pytest
import torch
from quant_models import mlp_objective

from hesse import quant
from hesse.quant import Quantizer


def test_search_returns_the_cheapest_frontier_point_within_tolerance():
    obj = mlp_objective()
    sens = quant.sensitivity(obj, (2, 3, 4, 8), budget=20)
    loss = quant.objective_loss(obj)
    baseline = loss(obj.model)
    r = quant.search(obj, sens=sens, tolerance=0.02, bits=(2, 3, 4, 8), points=12)
    assert r.baseline == pytest.approx(baseline) and r.target == pytest.approx(baseline + 0.02)
    assert r.met and r.metric <= r.target
    assert r.metric == pytest.approx(loss(quant.quantize(obj.model, r.bits, sens.quantizer)))
    path = r.path
    assert [p.cost for p in path] == sorted(p.cost for p in path)
    assert path[-1].bits == r.start.bits and path[-1].cost <= sens_budget(sens)
    measured = [loss(quant.quantize(obj.model, p.bits, sens.quantizer)) for p in path]
    ok = [m <= r.target for m in measured]
    if ok == sorted(ok):  # monotone along the path: bisection finds the first that passes
        assert r.cost == path[ok.index(True)].cost
    assert len(r.evaluations) < len(path)  # bisection measures fewer than all


def sens_budget(sens):
    return sum(r.n_params * 8 / 8 for r in sens.layers)


def test_search_says_when_the_budget_cannot_meet_the_tolerance():
    obj = mlp_objective()
    r = quant.search(obj, tolerance=-1.0, bits=(2, 4), points=4)
    assert not r.met and r.bits == r.start.bits and len(r.evaluations) == 1


def test_bit_switching_rounds_the_stored_codes():
    obj = mlp_objective()
    model = obj.model
    q = Quantizer(8, "channel")
    sw = quant.BitSwitch(model, (8, 4, 2), quantizer=q)
    W = model[0].weight.detach()
    assert torch.equal(sw.weight("0", 8), q.fake(W))  # the stored width is plain quantization
    c8 = q.codes(W)
    q4 = torch.round(c8.q / 16).clamp(-7, 7)
    assert torch.allclose(sw.weight("0", 4), (16 * c8.scale * q4).reshape(W.shape))
    assert sw.weight("0", 2).reshape(6, -1).div(64 * c8.scale).round().abs().max() <= 1
    assert torch.equal(sw.model(4)[0].weight, sw.weight("0", 4).to(W.dtype))
    with pytest.raises(ValueError, match="width 3 is not served"):
        sw.weight("0", 3)
    with pytest.raises(ValueError, match="at least 2"):
        quant.BitSwitch(model, (8, 1))


def test_switch_schedule_follows_the_hessian_order():
    obj = mlp_objective()
    sens = quant.sensitivity(obj, (2, 4, 8), budget=20)
    sw = quant.BitSwitch(obj.model, (8, 4, 2), sens=sens)
    steps = sw.schedule()
    assert steps[0].bits == {"0": 8, "2": 8} and steps[-1].bits == {"0": 2, "2": 2}
    assert len(steps) == 5 and [s.size_bytes for s in steps] == sorted(
        [s.size_bytes for s in steps], reverse=True
    )
    first = next(n for n in steps[1].bits if steps[1].bits[n] == 4)
    rise = {n: sens[n].score * (sw.delta_sq[n][4] - sw.delta_sq[n][8]) / sens[n].n_params
            for n in ("0", "2")}  # fmt: skip
    assert first == min(rise, key=rise.get)
    with pytest.raises(ValueError, match="sens="):
        quant.BitSwitch(obj.model).schedule()
