"""A small registry of seeded float64 objectives: models x losses x batch layouts.

Every case is tiny (d <= ~130) so that dense references are cheap. Each case also knows how to
write its full-data mean loss by hand (``full_loss``), independently of ``hesse``, so tests can
check the references themselves against ``torch.func``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hesse

DT = torch.float64


@dataclass(frozen=True)
class Case:
    """One objective: ``build() -> (model, data, Objective kwargs)``.

    ``full_loss(forward, data)`` is the full-data mean loss written by hand, where
    ``forward(*args, **kwargs)`` calls the model (possibly with substituted parameters).
    ``loss`` names the loss when the objective is built with ``loss=`` (GGN/Fisher apply),
    else None.
    """

    name: str
    build: Callable[[], tuple[nn.Module, object, dict]]
    full_loss: Callable[[Callable, object], torch.Tensor]
    loss: str | None


def _split(n_per_batch, *tensors):
    out, start = [], 0
    for n in n_per_batch:
        out.append(tuple(t[start : start + n] for t in tensors))
        start += n
    return out


def _tuple_full(loss):
    def full(forward, data):
        xs, ys = zip(*[(b[0], b[1]) for b in data], strict=True)
        return loss(forward(torch.cat(xs)), torch.cat(ys))

    return full


def _dict_full(forward, data):
    cat = {k: torch.cat([b[k] for b in data]) for k in data[0]}
    labels = cat.pop("labels")
    return F.cross_entropy(forward(**cat)["logits"], labels)


def _mlp(sizes):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(DT)


def mlp_ce():
    torch.manual_seed(0)
    model = _mlp([4, 8, 3]).eval()
    x, y = torch.randn(12, 4, dtype=DT), torch.randint(0, 3, (12,))
    return model, _split([5, 5, 2], x, y), {"loss": F.cross_entropy}


def mlp_mse():
    torch.manual_seed(1)
    model = _mlp([3, 6, 2]).eval()
    x, y = torch.randn(8, 3, dtype=DT), torch.randn(8, 2, dtype=DT)
    data = [list(b) for b in _split([4, 4], x, y)]  # list batches, not tuples
    return model, data, {"loss": F.mse_loss}


def linear_mse():
    torch.manual_seed(2)
    model = nn.Linear(3, 2).to(DT).eval()
    x, y = torch.randn(7, 3, dtype=DT), torch.randn(7, 2, dtype=DT)
    return model, _split([3, 3, 1], x, y), {"loss": F.mse_loss}


class SmallCNN(nn.Module):
    """Conv2d + BatchNorm2d (eval) + ReLU + avg-pool + Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


def cnn_bn_ce():
    torch.manual_seed(3)
    model = SmallCNN().to(DT)
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        model.bn.running_mean.copy_(0.3 * torch.randn(3, dtype=DT))
        model.bn.running_var.copy_(0.5 + torch.rand(3, dtype=DT))
        model.bn.weight.copy_(1 + 0.2 * torch.randn(3, dtype=DT))
        model.bn.bias.copy_(0.2 * torch.randn(3, dtype=DT))
    model.eval()
    x, y = torch.randn(10, 1, 6, 6, dtype=DT), torch.randint(0, 3, (10,))
    return model, _split([4, 4, 2], x, y), {"loss": F.cross_entropy}


class ResidualBlock(nn.Module):
    """Pre-LayerNorm residual MLP block with GELU, then a linear head."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(5)
        self.fc1 = nn.Linear(5, 8)
        self.fc2 = nn.Linear(8, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(x + self.fc2(F.gelu(self.fc1(self.ln(x)))))


def block_ce():
    torch.manual_seed(4)
    model = ResidualBlock().to(DT)
    with torch.no_grad():
        model.ln.weight.copy_(1 + 0.3 * torch.randn(5, dtype=DT))
        model.ln.bias.copy_(0.3 * torch.randn(5, dtype=DT))
    model.eval()
    x, y = torch.randn(10, 5, dtype=DT), torch.randint(0, 3, (10,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # batches of 4, 4, 2
    return model, loader, {"loss": F.cross_entropy}


class DictNet(nn.Module):
    """Keyword-argument model returning a Mapping with "logits"."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x, scale):
        return {"logits": self.fc2(torch.tanh(self.fc1(x))) * scale[:, None]}


def _dict_batches(seed):
    torch.manual_seed(seed)
    x, s = torch.randn(11, 4, dtype=DT), 0.5 + torch.rand(11, dtype=DT)
    y = torch.randint(0, 3, (11,))
    y[6] = -100  # ignored label: batch weights count labels != -100
    return [{"x": a, "scale": b, "labels": c} for a, b, c in _split([4, 4, 3], x, s, y)]


def dict_ce():
    torch.manual_seed(5)
    model = DictNet().to(DT).eval()
    return model, _dict_batches(50), {"loss": F.cross_entropy}


class HFNet(DictNet):
    """Hugging-Face style: takes labels and returns an object with ``.loss``."""

    def forward(self, x, scale, labels=None):
        logits = super().forward(x, scale)["logits"]
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SimpleNamespace(loss=loss, logits=logits)


def dict_hf():
    torch.manual_seed(6)
    model = HFNet().to(DT).eval()
    return model, _dict_batches(60), {}


def _hf_full(forward, data):
    return _dict_full(lambda **kw: {"logits": forward(**kw).logits}, data)


class SeqNet(nn.Module):
    """Per-token classifier on (B, T, 3) features."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.fc2 = nn.Linear(5, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def seq_loss_fn(model, batch):
    """Mean cross-entropy over the non-masked tokens; weight = number of such tokens."""
    logits = model(batch["x"])
    tok = F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten(), reduction="none")
    m = batch["mask"].flatten().to(logits.dtype)
    n = m.sum()
    return (tok * m).sum() / n, n


def _seq_full(forward, data):
    tot, cnt = 0.0, 0.0
    for b in data:
        logits = forward(b["x"])
        tok = F.cross_entropy(logits.flatten(0, 1), b["y"].flatten(), reduction="none")
        m = b["mask"].flatten().to(logits.dtype)
        tot, cnt = tot + (tok * m).sum(), cnt + m.sum()
    return tot / cnt


def seq_lossfn():
    torch.manual_seed(7)
    model = SeqNet().to(DT).eval()
    data = []
    for b, n_tokens in [(3, 9), (3, 5), (1, 2)]:  # very different token counts per batch
        mask = torch.zeros(b * 4, dtype=torch.bool)
        mask[torch.randperm(b * 4)[:n_tokens]] = True
        data.append(
            {
                "x": torch.randn(b, 4, 3, dtype=DT),
                "y": torch.randint(0, 4, (b, 4)),
                "mask": mask.view(b, 4),
            }
        )
    return model, data, {"loss_fn": seq_loss_fn}


CASES = {
    c.name: c
    for c in [
        Case("mlp_ce", mlp_ce, _tuple_full(F.cross_entropy), "cross_entropy"),
        Case("mlp_mse", mlp_mse, _tuple_full(F.mse_loss), "mse"),
        Case("linear_mse", linear_mse, _tuple_full(F.mse_loss), "mse"),
        Case("cnn_bn_ce", cnn_bn_ce, _tuple_full(F.cross_entropy), "cross_entropy"),
        Case("block_ce", block_ce, _tuple_full(F.cross_entropy), "cross_entropy"),
        Case("dict_ce", dict_ce, _dict_full, "cross_entropy"),
        Case("dict_hf", dict_hf, _hf_full, None),
        Case("seq_lossfn", seq_lossfn, _seq_full, None),
    ]
}
ALL = sorted(CASES)
WITH_LOSS = sorted(n for n, c in CASES.items() if c.loss is not None)
CE_TUPLE = ["mlp_ce", "cnn_bn_ce", "block_ce"]


def objective(name, **kwargs):
    """A fresh ``hesse.Objective`` for the named case (float64)."""
    model, data, kw = CASES[name].build()
    return hesse.Objective(model, data, **kw, dtype=DT, **kwargs)


@functools.cache
def dense(kind, name):
    """Cached dense reference ("hessian" | "ggn" | "fisher") of the named case."""
    fn = {
        "hessian": hesse.reference.dense_hessian,
        "ggn": hesse.reference.dense_ggn,
        "fisher": hesse.reference.dense_fisher,
    }[kind]
    return fn(objective(name)).detach()


def flat_loss(name):
    """``theta -> full-data mean loss`` written by hand, and theta0, in ``obj.space`` order."""
    model, data, _ = CASES[name].build()
    data = list(data)
    space = objective(name).space
    slices = space.slices()
    shapes = {n: p.shape for n, p in model.named_parameters()}

    def unflatten(theta):
        return {n: theta[slices[n]].reshape(shapes[n]) for n in space.names}

    def loss(theta):
        params = unflatten(theta)

        def forward(*args, **kwargs):
            return torch.func.functional_call(model, params, args, kwargs)

        return CASES[name].full_loss(forward, data)

    theta0 = torch.cat([dict(model.named_parameters())[n].detach().flatten() for n in space.names])
    return loss, theta0


def sym_matrix(eigvals, seed=0):
    """Dense symmetric float64 matrix ``Q diag(eigvals) Q^T`` with a seeded random rotation Q."""
    eigvals = torch.as_tensor(eigvals, dtype=DT)
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigvals), len(eigvals), generator=gen, dtype=DT))
    a = (q * eigvals) @ q.T
    return (a + a.T) / 2


def uneven_mlp():
    """An MLP whose last layer has 3 rows (fewer than 4 processes) and 5 uneven batches.

    Returns ``(model, FSDP units, batches, Objective keywords)`` for the sharded tests.
    """
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT).eval()
    x, y = torch.randn(17, 4, dtype=DT), torch.randint(0, 3, (17,))
    cuts = [0, 5, 8, 12, 13, 17]
    batches = [(x[a:b], y[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
    return model, [model[0], model[2]], batches, {"loss": F.cross_entropy}
