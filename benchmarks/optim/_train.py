"""Problems, optimizers and the training loop of the optimizer benchmark (see run.py)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hesse import HessianOperator, Objective, eigs, optim, regularize, trace
from hesse.demo import digits, tiny_lm
from hesse.problem._evaluate import evaluate


@dataclass
class Problem:
    """A demo's model factory, split data and loss conventions."""

    name: str
    build: callable
    train: tuple
    test: tuple
    batch_size: int
    epochs: int
    loss: callable | None = None
    loss_fn: callable | None = None
    curvature_samples: int = 10_000
    extra: dict = field(default_factory=dict)

    def batches(self, generator: torch.Generator) -> list:
        x, y = self.train
        order = torch.randperm(len(x), generator=generator)
        return [(x[i], y[i]) for i in order.split(self.batch_size)]

    def logits_and_loss(self, model, batch):
        """``(logits of the counted rows, mean loss)``: what every optimizer's closure needs."""
        x, y = batch
        out = model(x)
        if self.loss_fn is None:
            return out, F.cross_entropy(out, y)
        keep = y != tiny_lm.IGNORE
        return out[keep], F.cross_entropy(out[keep], y[keep])

    def evaluate(self, model, part: tuple) -> dict:
        data = [(part[0][i : i + 512], part[1][i : i + 512]) for i in range(0, len(part[0]), 512)]
        ev = evaluate(model, data, self.loss, loss_fn=self.loss_fn)
        return {"loss": ev.loss, "accuracy": ev.accuracy}

    def curvature(self, model, budget: int) -> dict:
        """Top Hessian eigenvalue and Hutch++ trace on (a prefix of) the training part."""
        x, y = self.train
        n = min(len(x), self.curvature_samples)
        data = [(x[i : min(i + 256, n)], y[i : min(i + 256, n)]) for i in range(0, n, 256)]
        H = HessianOperator(Objective(model, data, self.loss, loss_fn=self.loss_fn))
        top = eigs(H, k=1, max_matvecs=budget, tol=1e-3)
        tr = trace(H, budget=budget, seed=0)
        return {
            "lambda_max": float(top.values[0]),
            "lambda_max_converged": top.converged,
            "trace": tr.value,
            "trace_stderr": tr.stderr,
            "samples": n,
        }


def digits_problem(epochs: int) -> Problem:
    config = digits.Config(holdout=0.2)
    train, test = digits.parts(config)
    return Problem(
        "digits", lambda: digits.build_model(config), train, test, 64, epochs, loss=F.cross_entropy
    )


def tiny_lm_problem(epochs: int) -> Problem:
    config = tiny_lm.Config(holdout=0.2)
    train, test = tiny_lm.parts(config)
    return Problem(
        "tiny-lm",
        lambda: tiny_lm.build_model(config),
        train,
        test,
        32,
        epochs,
        loss_fn=tiny_lm.token_loss,
        curvature_samples=128,
    )


class RowSums(optim.Hutchinson):
    """The probes of pytorch_optimizer <= 2.x: ``randint_like(p, 0, 1) * 2 - 1`` is all -1."""

    def draw(self, params, generator):
        return [[-torch.ones_like(p) for p in params] for _ in range(self.probes)]


def make_optimizer(name: str, params, lr: float):
    """The optimizer ``name`` at learning rate ``lr`` (the other settings fixed)."""
    params = list(params)
    if name in ("SGD", "trace penalty"):
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "AdaHessian":
        return optim.AdaHessian(params, lr=lr)
    if name == "AdaHessian (all -1 probes)":
        return optim.AdaHessian(params, lr=lr, estimator=RowSums())
    if name == "SophiaH":
        return optim.SophiaH(params, lr=lr, rho=0.04, weight_decay=0.0, update_every=10)
    if name == "SophiaG":
        return optim.SophiaG(params, lr=lr, rho=0.04, weight_decay=0.0, update_every=10)
    if name == "SAM":
        return optim.SAM(params, torch.optim.SGD, rho=0.05, lr=lr, momentum=0.9)
    if name == "M-FAC":
        return optim.MFAC(params, lr=lr, m=32, damping=1e-3, momentum=0.9)
    return _peer(name, params, lr)


def _peer(name: str, params, lr: float):
    import pytorch_optimizer as po

    if name == "pytorch_optimizer AdaHessian":
        return po.AdaHessian(params, lr=lr)
    if name == "pytorch_optimizer SophiaH":
        # it steps by lr * clip(m / max(h, eps), p): hesse's rho = p and lr = its lr * p
        return po.SophiaH(params, lr=lr, p=PEER_CLIP, update_period=10, weight_decay=0.0)
    raise ValueError(f"unknown optimizer {name!r}")


PEER_CLIP = 0.04
"""pytorch_optimizer SophiaH's ``p``, equal to hesse's ``rho`` so that the two match."""

PENALTY = 1e-3
"""Weight of ``regularize.hessian_trace`` in the "trace penalty" runs."""


def _step(name: str, opt, model, batch, problem: Problem, step: int = 0) -> float:
    """One training step of any optimizer on one batch; returns the batch loss.

    ``step`` seeds the trace penalty's probes, so that a rerun draws the same ones.
    """
    if name.startswith("pytorch_optimizer"):  # its Hessian needs backward(create_graph=True)
        opt.zero_grad()
        _, loss = problem.logits_and_loss(model, batch)
        loss.backward(create_graph=True)
        opt.step()
        for p in model.parameters():
            p.grad = None  # break the graph that .grad holds, or memory grows every step
        return loss.item()
    if name in ("SGD", "AdamW", "trace penalty"):
        opt.zero_grad()
        _, loss = problem.logits_and_loss(model, batch)
        total = loss
        if name == "trace penalty":
            total = loss + PENALTY * regularize.hessian_trace(loss, model.parameters(), seed=step)
        total.backward()
        opt.step()
        return loss.item()
    if name == "SophiaG":

        def closure():
            logits, loss = problem.logits_and_loss(model, batch)
            return loss, logits

        return float(opt.step(closure))
    return float(opt.step(lambda: problem.logits_and_loss(model, batch)[1]))


def train(problem: Problem, name: str, lr: float) -> dict:
    """Train a fresh model; final train/test loss and accuracy, seconds per step."""
    model = problem.build().train(False)
    opt = make_optimizer(name, model.parameters(), lr)
    generator = torch.Generator().manual_seed(0)
    seconds, diverged = [], False
    for _ in range(problem.epochs):
        for batch in problem.batches(generator):
            start = time.perf_counter()
            loss = _step(name, opt, model, batch, problem, len(seconds))
            seconds.append(time.perf_counter() - start)
            if not loss < 1e3:  # nan or exploded
                diverged = True
                break
        if diverged:
            break
    out = {
        "lr": lr,
        "steps": len(seconds),
        # the median: other processes on a shared machine slow some steps down
        "seconds_per_step": sorted(seconds)[len(seconds) // 2],
        "diverged": diverged,
        "state_bytes": _bytes(opt.state_dict()),
    }
    if not diverged:
        out["train"] = problem.evaluate(model, problem.train)
        out["test"] = problem.evaluate(model, problem.test)
    return out, model


def _bytes(obj) -> int:
    """Bytes of every tensor in a (nested) state dict."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_bytes(v) for v in obj)
    return 0


def checkpoints(problem: Problem, name: str, lr: float) -> list[tuple[float, dict]]:
    """Train like :func:`train`, keeping ``(train loss, weights)`` at the end of every epoch."""
    model = problem.build().train(False)
    opt = make_optimizer(name, model.parameters(), lr)
    generator = torch.Generator().manual_seed(0)
    kept, step = [], 0
    for _ in range(problem.epochs):
        for batch in problem.batches(generator):
            _step(name, opt, model, batch, problem, step)
            step += 1
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        kept.append((problem.evaluate(model, problem.train)["loss"], weights))
    return kept


def matched_flatness(problem: Problem, lrs: dict[str, float], budget: int) -> list[dict]:
    """Curvature of SAM's and the trace penalty's final models and of SGD at the same loss.

    SGD's epoch checkpoints are searched for the training loss closest (in ratio) to the
    other method's final one, so that flatness is compared at similar training loss.
    """
    sgd = checkpoints(problem, "SGD", lrs["SGD"])
    rows = []
    for name in ("SAM", "trace penalty"):
        if name not in lrs:
            continue
        loss, weights = checkpoints(problem, name, lrs[name])[-1]
        near_loss, near = min(sgd, key=lambda c: abs(math.log(c[0] / loss)))
        row = {"name": name, "lr": lrs[name], "sgd_lr": lrs["SGD"]}
        for label, w, value in (("model", weights, loss), ("sgd", near, near_loss)):
            model = problem.build().train(False)
            model.load_state_dict(w)
            row[label] = {"train_loss": value, **problem.curvature(model, budget)}
        rows.append(row)
    return rows
