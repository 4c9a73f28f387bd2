import copy
import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from optim_models import closure, closure_logits, data, mlp, params_vector

from hesse import optim

MAKERS = {
    "AdaHessian": lambda p: optim.AdaHessian(p, lr=0.05, weight_decay=0.01, seed=1),
    "SophiaH": lambda p: optim.SophiaH(p, lr=0.05, update_every=2, seed=1),
    "SophiaG": lambda p: optim.SophiaG(p, lr=0.05, update_every=2, seed=1),
    "MFAC": lambda p: optim.MFAC(p, lr=0.01, m=3, damping=0.1, momentum=0.9),
    "SAM": lambda p: optim.SAM(p, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
    "NewtonCG": lambda p: optim.NewtonCG(p, lr=0.5, damping=0.5, max_matvecs=6),
}


def _closure(name, model, x, y):
    return closure_logits(model, x, y) if name == "SophiaG" else closure(model, x, y)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_state_dict_resumes_identically(name):
    x, y = data()
    model = mlp()
    opt = MAKERS[name](model.parameters())
    for _ in range(3):
        opt.step(_closure(name, model, x, y))
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    for _ in range(4):
        opt.step(_closure(name, model, x, y))
    fresh = mlp(seed=5)
    fresh.load_state_dict(saved_model)
    fresh_opt = MAKERS[name](fresh.parameters())
    fresh_opt.load_state_dict(saved_opt)
    for _ in range(4):
        fresh_opt.step(_closure(name, fresh, x, y))
    assert torch.equal(params_vector(fresh), params_vector(model))


@pytest.mark.parametrize("name", ["AdaHessian", "SophiaH"])
def test_accumulating_micro_batches_equals_one_batch(name):
    x, y = data()
    whole, parts = mlp(), mlp()
    opt_whole, opt_parts = MAKERS[name](whole.parameters()), MAKERS[name](parts.parameters())
    for _ in range(3):
        opt_whole.step(closure(whole, x, y))
        for idx in (slice(0, 6), slice(6, 12)):
            opt_parts.accumulate(F.cross_entropy(parts(x[idx]), y[idx]) / 2)
        opt_parts.step()
    assert torch.allclose(params_vector(parts), params_vector(whole), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_param_groups_take_their_own_learning_rate(name):
    x, y = data()
    model = mlp()
    first = [model[0].weight, model[0].bias]
    rest = [model[2].weight, model[2].bias]
    opt = MAKERS[name]([{"params": first, "lr": 0.0}, {"params": rest}])
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(_closure(name, model, x, y))
    if name in ("AdaHessian", "SophiaH", "SophiaG"):  # decoupled decay scales with lr too
        assert torch.equal(model[0].weight, before[0]) and torch.equal(model[0].bias, before[1])
    else:
        assert torch.equal(model[0].weight, before[0])
    assert not torch.equal(model[2].weight, before[2])


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_a_closure_that_returns_no_loss_is_refused(name):
    model = mlp()
    opt = MAKERS[name](model.parameters())
    with pytest.raises(ValueError, match="closure must return"):
        opt.step(lambda: 1.0)


@pytest.mark.parametrize("name", ["AdaHessian", "SophiaH", "NewtonCG"])
def test_a_closure_that_called_backward_is_refused_by_the_curvature_optimizers(name):
    x, y = data()
    model = mlp()
    opt = MAKERS[name](model.parameters())

    def calls_backward():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="called backward"):
        opt.step(calls_backward)


def test_sophia_g_without_logits_is_refused_with_the_fix():
    x, y = data()
    model = mlp()
    opt = MAKERS["SophiaG"](model.parameters())
    with pytest.raises(ValueError, match=r"\(loss, logits\)"):
        opt.step(closure(model, x, y))
    with pytest.raises(ValueError, match="needs the logits"):
        opt.accumulate(F.cross_entropy(model(x), y))


def test_step_without_closure_or_accumulated_gradient_is_refused():
    opt = MAKERS["AdaHessian"](mlp().parameters())
    with pytest.raises(ValueError, match="accumulate"):
        opt.step()


@pytest.mark.parametrize("name", ["AdaHessian", "SophiaH", "SophiaG", "SAM"])
def test_runs_under_bf16_autocast_on_cpu(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = data()
    x = x.float()
    opt = MAKERS[name](model.parameters())
    losses = []
    for _ in range(15):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = opt.step(_closure(name, model, x, y))
        losses.append(float(out))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]


def _rss_mb() -> float:
    """Resident memory of this process now (Linux), in MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _wide():
    """A model whose graph is about 0.15 MiB per step, so that a kept graph shows in the RSS."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 40, generator=gen), torch.randint(0, 5, (256,), generator=gen)
    return model.double(), x.double(), y


def _growth(step, n: int) -> float:
    """RSS growth in MiB from step 50 to step ``n``."""
    for i in range(n):
        step()
        if i == 49:
            gc.collect()
            before = _rss_mb()
    gc.collect()
    return _rss_mb() - before


LINUX = pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc (Linux)")


CHEAP = {
    "AdaHessian": MAKERS["AdaHessian"],
    "NewtonCG": lambda p: optim.NewtonCG(p, lr=0.5, damping=0.5, max_matvecs=2),
}


def _measure(kind: str, n: int) -> float:
    """RSS growth of ``n`` steps of ``kind`` (a ``CHEAP`` optimizer, or ``"leak"``)."""
    torch.set_num_threads(1)
    model, x, y = _wide()
    if kind == "leak":  # backward(create_graph=True) chains every step's graph through .grad
        sgd = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step():
            F.cross_entropy(model(x), y).backward(create_graph=True)
            sgd.step()

    else:
        opt = CHEAP[kind](model.parameters())

        def step():
            opt.step(closure(model, x, y))

    return _growth(step, n)


def _growth_in_a_fresh_process(kind: str, n: int) -> float:
    """``_measure`` in a new interpreter.

    In this one, memory that earlier tests freed would be reused by the allocator and hide
    the growth from the resident size.
    """
    code = (
        f"import sys, warnings; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"warnings.simplefilter('ignore'); import test_shell; "
        f"print(test_shell._measure({kind!r}, {n}))"
    )
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    return float(done.stdout.split()[-1])


@LINUX
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CHEAP))
def test_memory_stays_flat_over_1000_steps(name):
    # one graph kept per step would add about 140 MiB (0.24 MiB measured without)
    assert _growth_in_a_fresh_process(name, 1000) < 10


@LINUX
def test_the_memory_check_sees_the_usual_create_graph_leak():
    assert _growth_in_a_fresh_process("leak", 200) > 10  # 28 MiB measured
