r"""The pieces of HESSO: the base step, the group saliency, the choice, and CRIC's memory.

HESSO (Chen, Liang, Ding, Zhu, Zharkov & Zhang 2024, "HESSO: Towards Automatic Efficient
and User Friendly Any Neural Network Training and Pruning") moves every weight by its base
optimizer's step :math:`x \leftarrow x - \eta d` (SGD with momentum, Adam or AdamW) and ranks
groups by a mix of five scores of the weights :math:`x_g` and the step direction :math:`d_g`,
each divided by its Euclidean norm over all groups, weighted 0.2 each (the reference code's
default):

.. math::
    \|x_g\|, \quad \frac{\|x_g\|}{|g|}, \quad \cos(x_g, d_g) + 1, \quad
    |x_g^\top d_g|, \quad \tfrac12 (x_g^\top d_g)^2 .

The last is the Hessian-aware one: the second-order Taylor term of removing the group with
the rank-one curvature :math:`d d^\top` (hesse's NViT saliency with one gradient).
"""

from __future__ import annotations

import math

import torch

from ._hesso_groups import GroupIndex
from ._units import Unit

SALIENCY = {
    "magnitude": 0.2,
    "avg_magnitude": 0.2,
    "cosine_similarity": 0.2,
    "taylor_first_order": 0.2,
    "taylor_second_order": 0.2,
}
VARIANTS = ("sgd", "adam", "adamw")
_SAFE = 1e-8  # the reference code's safeguard in norms and cosines


def base_step(
    p: torch.Tensor, g: torch.Tensor, state: dict, *, variant: str, lr: float,
    momentum: float, betas: tuple[float, float], eps: float, weight_decay: float,
) -> tuple[torch.Tensor, torch.Tensor, dict]:  # fmt: skip
    r"""One step of the base optimizer, as ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` take it.

    .. math::
        \text{sgd: } d = \mu\, b + (g + \lambda x), \qquad
        \text{adam(w): } d = \frac{m / (1-\beta_1^t)}{\sqrt{v} / \sqrt{1-\beta_2^t} + \epsilon},
        \qquad x' = x - \eta d \;\; (\text{adamw: } x' = x(1 - \eta\lambda) - \eta d)

    Args:
        p: The parameter :math:`x` (any shape).
        g: Its gradient, shaped like ``p``.
        state: The optimizer state of ``p`` (``buf``; or ``step``, ``m``, ``v``), ``{}`` at first.
        variant: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr, momentum, betas, eps, weight_decay: As in ``torch.optim``.

    Returns:
        ``(new_p, d, new_state)``: the new parameter, the direction :math:`d` the saliency
        reads, and the new state; nothing is modified in place.
    """
    if variant == "sgd":
        d = g + weight_decay * p if weight_decay else g
        if momentum:
            d = d if "buf" not in state else momentum * state["buf"] + d
            state = {"buf": d}
        return p - lr * d, d, state
    t = state.get("step", 0) + 1
    b1, b2 = betas
    if variant == "adam" and weight_decay:
        g = g + weight_decay * p
    m = b1 * state.get("m", torch.zeros_like(p)) + (1 - b1) * g
    v = b2 * state.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
    d = (m / (1 - b1**t)) / (v.sqrt() / math.sqrt(1 - b2**t) + eps)
    x = p * (1 - lr * weight_decay) if variant == "adamw" else p
    return x - lr * d, d, {"step": t, "m": m, "v": v}


def saliency(
    index: GroupIndex, x: list[torch.Tensor], d: list[torch.Tensor], weights: dict[str, float]
) -> torch.Tensor:
    """``(G,)`` float64 HESSO score of each group (the smallest are redundant); see the module.

    Raises:
        ValueError: a weight key that is not one of :data:`SALIENCY`.
    """
    check_saliency(weights)
    xx = index.segment_sum([a * a for a in x])
    xd = index.segment_sum([a * b for a, b in zip(x, d, strict=True)])
    dd = index.segment_sum([b * b for b in d])
    raw = {
        "magnitude": xx.sqrt(),
        "avg_magnitude": xx.sqrt() / index.sizes,
        "cosine_similarity": xd / (xx.sqrt() + _SAFE) / (dd.sqrt() + _SAFE) + 1,
        "taylor_first_order": xd.abs(),
        "taylor_second_order": 0.5 * xd**2,
    }
    total = torch.zeros_like(xx)
    for name, w in weights.items():
        total += w * raw[name] / (raw[name].norm() + _SAFE)
    return total


def check_saliency(weights: dict[str, float]) -> None:
    """Refuse saliency weights whose keys are not those of :data:`SALIENCY`.

    Raises:
        ValueError: naming the unknown keys and the known ones.
    """
    unknown = set(weights) - set(SALIENCY)
    if unknown:
        raise ValueError(
            f"HESSO: unknown saliency {sorted(unknown)}; the keys are {list(SALIENCY)} "
            "(omit a score to give it weight 0)."
        )


def choose(
    scores: torch.Tensor, modules: torch.Tensor, taken: torch.Tensor, k: int
) -> torch.Tensor:
    """``(G,)`` bool: the ``k`` lowest-scored groups not ``taken``; each module keeps its best.

    Every module keeps its highest-scored group not taken, so no layer loses all its channels
    or heads; fewer than ``k`` are chosen when that rule leaves fewer candidates.
    """
    s = scores.clone()
    s[taken] = torch.inf
    for m in modules.unique():
        alive = ((modules == m) & ~taken).nonzero().reshape(-1)
        if len(alive):
            s[alive[s[alive].argmax()]] = torch.inf
    k = min(k, int(torch.isfinite(s).sum()))
    out = torch.zeros_like(taken)
    out[s.argsort()[:k]] = True
    return out


def period_targets(total: int, periods: int) -> list[int]:
    """Groups to pick in each pruning period: ``total // periods``, the remainder last."""
    each = [total // periods] * periods
    each[-1] += total - sum(each)
    return each


class Cycle:
    """CRIC's memory: the starting point, accumulated scores, charges, the sets tried."""

    def __init__(self, x0: list[torch.Tensor], states: list[dict], ref: float, G: int):
        self.x0, self.states, self.ref = x0, states, max(ref, 1e-12)
        self.total = torch.zeros(G, dtype=torch.float64)
        self.count = 0
        self.charges = torch.zeros(G, dtype=torch.float64)
        self.tried = torch.zeros(G, dtype=torch.bool)
        self.V = torch.zeros(G, dtype=torch.bool)
        self.losses: list[float] = []
        self.cycles, self.t = 0, 0

    def begin(self, V: torch.Tensor) -> None:
        """Start a cycle that shrinks the ``(G,)`` bool violating set ``V``."""
        self.V, self.tried = V, self.tried | V
        self.losses, self.t = [], 0
        self.cycles += 1

    def add(self, scores: torch.Tensor) -> None:
        """Accumulate one ``(G,)`` saliency sample."""
        self.total += scores
        self.count += 1

    def factors(self, S: int) -> torch.Tensor:
        """``(G,)`` this step's shrink factors over a cycle of ``S`` steps; advances the step."""
        f = torch.ones_like(self.total)
        f[self.V] = (S - self.t - 1) / (S - self.t)
        self.t += 1
        return f

    def charge(self, weight: float) -> None:
        r"""Charge :math:`w (\bar L / L_0 - 1)_+ / |V|` to each group of this cycle's set."""
        if self.V.any() and self.losses:
            rise = max(sum(self.losses) / len(self.losses) / self.ref - 1.0, 0.0)
            self.charges[self.V] += weight * rise / int(self.V.sum())

    def accumulated(self) -> torch.Tensor:
        """``(G,)`` mean sampled saliency plus the charged loss increases."""
        return self.total / max(self.count, 1) + self.charges

    def tried_units(self, units: list[Unit]) -> tuple[Unit, ...]:
        """The ``units`` some cycle has shrunk."""
        return tuple(u for u, t in zip(units, self.tried.tolist(), strict=True) if t)
