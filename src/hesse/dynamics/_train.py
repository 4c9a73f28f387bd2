"""Built-in small problems and training loops for the edge-of-stability and LR-transfer runs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .monitor import SharpnessMonitor

PARAMETRIZATIONS = ("sp", "mup")
"""Width scalings of :class:`WidthMLP`: standard (PyTorch-like) and maximal-update (μP)."""


def digits_subset(samples: int = 256, *, seed: int = 0, dtype=torch.float64):
    """``samples`` scikit-learn digits: ``x (n, 64)`` of unit-norm images, one-hot ``y (n, 10)``.

    Unit-norm images keep the initial sharpness of :func:`eos_model` (about 3.3 with the
    squared loss) below ``2/eta`` for ``eta <= 0.4``, so that GD shows the progressive
    sharpening before the edge of stability rather than an initial catapult.
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    index = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:samples]
    inputs = torch.as_tensor(x, dtype=dtype)[index]
    inputs = inputs / inputs.norm(dim=1, keepdim=True)
    return inputs, F.one_hot(torch.as_tensor(y)[index], 10).to(dtype)


class WidthMLP(nn.Module):
    r"""``64 -> n -> n -> 10`` tanh MLP in standard (SP) or maximal-update (μP) parametrization.

    Each layer computes :math:`m_l W_l h` with trained weights
    :math:`W_l \sim \mathcal N(0, 1/\text{fan\_in})` (hidden and output) and a fixed multiplier
    :math:`m_l`. SP: :math:`m = 1` everywhere, the
    input layer drawn with variance :math:`1/d`. μP (Yang & Hu 2021, "Tensor Programs IV",
    abc-form with one SGD learning rate): input :math:`W_1 \sim \mathcal N(0, 1/n)` with
    :math:`m_1 = \sqrt{n/d}` (the same function at initialization, updates :math:`n/d` times
    larger), hidden :math:`m_2 = 1`, output :math:`m_3 = 1/\sqrt n` (output weights of
    effective variance :math:`1/n^2`).

    Args:
        width: Hidden width ``n``.
        parametrization: ``"sp"`` or ``"mup"``.
        seed: Seed of the initialization.
    """

    def __init__(self, width: int, parametrization: str = "sp", *, seed: int = 0, d: int = 64):
        super().__init__()
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"WidthMLP: parametrization must be one of {PARAMETRIZATIONS}, "
                f"got {parametrization!r}."
            )
        gen = torch.Generator().manual_seed(seed)
        mup = parametrization == "mup"
        shapes = [(width, d), (width, width), (10, width)]
        fan1 = width if mup else d
        self.w1, self.w2, self.w3 = (
            nn.Parameter(torch.randn(s, generator=gen) / math.sqrt(f))
            for s, f in zip(shapes, (fan1, width, width), strict=True)
        )
        self.m1 = math.sqrt(width / d) if mup else 1.0
        self.m3 = 1 / math.sqrt(width) if mup else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, 10)``."""
        h = torch.tanh(self.m1 * x @ self.w1.T)
        h = torch.tanh(h @ self.w2.T)
        return self.m3 * h @ self.w3.T


def half_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``0.5 * ||f(x) - y||^2`` summed over outputs, averaged over samples (Cohen et al. 2021)."""
    return 0.5 * ((outputs - targets) ** 2).sum(-1).mean()


def eos_model(width: int = 64, *, seed: int = 0, outputs: int = 10) -> nn.Module:
    """The edge-of-stability model: ``64 -> width -> width -> outputs`` tanh MLP (PyTorch init)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, outputs),
    )  # fmt: skip


@dataclass
class Run:
    """What one training run recorded: step losses and, when monitored, the sharpness."""

    losses: list[float] = field(default_factory=list)
    diverged: bool = False


def train(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    lr: float,
    steps: int,
    momentum: float = 0.0,
    batch_size: int | None = None,
    loss=half_squared_error,
    monitor: SharpnessMonitor | None = None,
    seed: int = 0,
) -> Run:
    """(S)GD with heavy-ball momentum; full batch when ``batch_size`` is None.

    The monitor (if any) is stepped before each update, with ``lr`` and ``momentum``; a
    non-finite loss stops the run with ``diverged=True`` (before the monitor sees it).
    """
    x, y = data
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen, run = torch.Generator().manual_seed(seed), Run()
    for t in range(steps):
        if batch_size is None:
            xb, yb = x, y
        else:
            index = torch.randperm(len(x), generator=gen)[:batch_size]
            xb, yb = x[index], y[index]
        value = loss(model(xb), yb)
        if not torch.isfinite(value):
            run.diverged = True
            break
        if monitor is not None:
            monitor.step(t, lr=lr, momentum=momentum)
        run.losses.append(float(value.detach()))
        opt.zero_grad()
        value.backward()
        opt.step()
    return run
