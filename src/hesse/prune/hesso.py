r"""HESSO: train and structurally prune in one run; CRIC to correct the redundant set.

HESSO (Chen, Liang, Ding, Zhu, Zharkov & Zhang 2024, "HESSO: Towards Automatic Efficient
and User Friendly Any Neural Network Training and Pruning") trains with a base optimizer and,
over ``pruning_periods`` periods of :math:`T` steps, picks the lowest-scored groups (see
:mod:`hesse.prune._hesso_core`) and shrinks them to zero step by step,

.. math::
    x_g \leftarrow \frac{T - t - 1}{T - t}\,(x_g - \eta\, d_g), \qquad t = 0, \dots, T-1,

so that they are exactly zero at the end of the period and stay zero after; the other groups
train on. The zeroed groups are then removed from a copy of the model by
:meth:`HessoResult.apply` (the model really shrinks, with the same outputs).

CRIC, the corrective redundant identification cycle, guards against an irreversible wrong
choice: from the point where pruning starts it runs cycles of ``sampling_steps`` steps; each
cycle restarts from that point, shrinks its *violating set* to zero while training the rest,
and samples the saliency of every group on the way. The loss increase along the way is charged
to the groups the cycle shrank. The next violating set is what the accumulated scores now rank
lowest but no cycle has tried; when none is left (or after ``max_cycles``), the lowest by the
accumulated score are the redundant groups, and HESSO shrinks them over ``pruning_steps`` from
the starting point.

Departures from the reference code (``only_train_once``, ``HESSO`` and ``HESSOCRIC``): groups
are hesse's (heads, MLP neurons, conv/linear channels, with the columns that read them, so
zeroing equals removing); every module keeps its best group; CRIC charges each cycle's loss
increase to the groups it shrank (the reference charges a whole layer's trial projections),
and restores the optimizer state with the parameters at each restart.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ._hesso_core import (
    SALIENCY,
    VARIANTS,
    Cycle,
    base_step,
    check_saliency,
    choose,
    period_targets,
    saliency,
)
from ._hesso_groups import GroupIndex, hesso_groups, remove_groups, removed_params
from ._units import Unit


@dataclass(frozen=True)
class CRIC:
    r"""Settings of the corrective redundant identification cycle.

    Attributes:
        sampling_steps: Steps of one cycle (the samples along the way to zero).
        max_cycles: Most cycles.
        tolerance: Stop when at most this many new groups would be tried.
        loss_weight: Weight of the charged loss increase :math:`(\bar L / L_0 - 1)_+ / |V|`
            against the saliency scores (which sum to about one over all groups).
    """

    sampling_steps: int = 20
    max_cycles: int = 10
    tolerance: int = 0
    loss_weight: float = 1.0


@dataclass(frozen=True)
class HessoResult:
    """What HESSO pruned so far; :meth:`apply` removes it from a copy of the model.

    Attributes:
        units: The groups pruned (exactly zero in the trained model).
        total_groups: Groups HESSO could prune.
        zero_groups: Groups whose weights are all exactly zero now.
        group_sparsity: ``len(units) / total_groups``.
        removed_params: Parameters that :meth:`apply` removes.
        total_params: Parameters of the model.
        finished: Whether the pruning schedule (CRIC included) is over.
        steps: Steps taken.
        cycles: CRIC cycles run (0 without CRIC).
        tried: Groups CRIC shrank in some cycle; those not in ``units`` were corrected.
    """

    units: tuple[Unit, ...]
    total_groups: int
    zero_groups: int
    group_sparsity: float
    removed_params: int
    total_params: int
    finished: bool
    steps: int
    cycles: int
    tried: tuple[Unit, ...]

    def apply(self, model: nn.Module) -> nn.Module:
        """A copy of the trained ``model`` without the pruned groups (same outputs, smaller).

        Raises:
            ValueError: the pruning schedule is not over yet.
        """
        if not self.finished:
            raise ValueError(
                f"HessoResult.apply: pruning is not finished after {self.steps} steps; train "
                "past start_pruning_step + the pruning (and CRIC) steps first."
            )
        return remove_groups(model, list(self.units))


class HESSO(torch.optim.Optimizer):
    r"""HESSO: a ``torch.optim`` optimizer that trains ``model`` and prunes its groups to zero.

    Args:
        model: The model; HESSO trains all its parameters that require gradients.
        lr: Learning rate :math:`\eta`.
        pruning_steps: Steps over which the groups are shrunk to zero (:math:`T` times the
            periods; with CRIC, the steps after it).
        groups: The groups (default: :func:`hesso_groups` of the model: heads and MLP neurons
            of tiny-lm/BERT, or the channels of an ``nn.Sequential`` conv/linear chain).
        variant: Base optimizer: ``"sgd"`` (``momentum``), ``"adam"`` or ``"adamw"``.
        momentum, betas, eps, weight_decay: Its hyper-parameters, as in ``torch.optim``.
        target_group_sparsity: Fraction of the groups to prune (0: the base optimizer).
        start_pruning_step: Steps of plain training first.
        pruning_periods: Periods in which the groups are picked (HESSO; 1 with CRIC).
        saliency: Weights of the scores (default :data:`SALIENCY`, 0.2 each).
        cric: :class:`CRIC` settings, or None for plain HESSO. CRIC needs the loss of each
            step: ``step(closure)`` or ``step(loss=...)``.

    Raises:
        ValueError: a setting out of range, or groups that own parameters not trained.

    Example:
        >>> import torch
        >>> from hesse.prune import HESSO
        >>> _ = torch.manual_seed(0)
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x, y = torch.randn(64, 4), torch.randn(64, 2)
        >>> opt = HESSO(model, lr=0.05, pruning_steps=20, target_group_sparsity=0.5)
        >>> for _ in range(30):
        ...     opt.zero_grad()
        ...     torch.nn.functional.mse_loss(model(x), y).backward()
        ...     opt.step()
        >>> result = opt.result()
        >>> result.group_sparsity, result.zero_groups, result.apply(model)[0].out_features
        (0.5, 4, 4)
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        *,
        pruning_steps: int,
        groups: Sequence[Unit] | None = None,
        variant: str = "sgd",
        momentum: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        target_group_sparsity: float = 0.5,
        start_pruning_step: int = 0,
        pruning_periods: int = 1,
        saliency: dict[str, float] | None = None,
        cric: CRIC | None = None,
    ):
        _check(variant, lr, pruning_steps, pruning_periods, target_group_sparsity, cric)
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        defaults = dict(lr=lr, momentum=momentum, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(list(named.values()), defaults)
        self.units = list(hesso_groups(model) if groups is None else groups)
        self.index = GroupIndex.build(named, self.units)
        self.variant, self.weights = variant, dict(SALIENCY if saliency is None else saliency)
        check_saliency(self.weights)
        self.total_params = sum(p.numel() for p in model.parameters())
        G = len(self.units)
        self.target = int(G * min(target_group_sparsity, 0.999))
        self.start, self.cric = start_pruning_step, cric
        self.periods = 1 if cric else pruning_periods
        self.T = pruning_steps // self.periods
        self.n_steps = 0
        self.pruned = torch.zeros(G, dtype=torch.bool)
        self.active = torch.zeros(G, dtype=torch.bool)
        self._cycle: Cycle | None = None
        self._hybrid_from: int | None = None if cric else start_pruning_step
        self._recent: list[float] = []

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable | None = None, *, loss: torch.Tensor | float | None = None
    ) -> torch.Tensor | None:
        """One training step, shrinking the groups the schedule says; see the class.

        Args:
            closure: Re-evaluates the model and returns the loss after ``backward`` (as in
                ``torch.optim``).
            loss: The loss of this step's batch, when no closure is given (CRIC reads it).

        Returns:
            The closure's loss, detached (None without a closure).

        Raises:
            ValueError: CRIC without the loss of the step.
        """
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        value = None if loss is None else float(loss)
        params = self.param_groups[0]["params"]
        x = [p.detach() for p in params]
        new, d = self._base(params)
        reset, factors = self._schedule(x, d, value)
        if reset is not None:
            new, states = reset
            for p, s in zip(params, states, strict=True):
                self.state[p] = copy.deepcopy(s)
        for p, v in zip(params, self.index.scale(new, factors), strict=True):
            p.copy_(v)
        self.n_steps += 1
        return loss.detach() if isinstance(loss, torch.Tensor) and closure else None

    def _base(self, params) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The base optimizer's new parameters and directions ``d`` (state updated)."""
        group = self.param_groups[0]
        hyper = {k: group[k] for k in ("lr", "momentum", "betas", "eps", "weight_decay")}
        new, d = [], []
        for p in params:
            if p.grad is None:  # as torch.optim: no gradient, no update and no state
                new.append(p.detach())
                d.append(torch.zeros_like(p))
                continue
            x, di, self.state[p] = base_step(
                p.detach(), p.grad, self.state[p], variant=self.variant, **hyper
            )
            new.append(x)
            d.append(di)
        return new, d

    def _schedule(self, x, d, loss: float | None):
        """``(reset or None, (G,) factors)``: what this step does to the groups."""
        k = self.n_steps
        if k >= self.start and self.cric is not None and self._hybrid_from is None:
            return self._cric_step(x, d, loss)
        if loss is not None:
            self._recent = (self._recent + [loss])[-20:]
        f = torch.ones(len(self.units), dtype=torch.float64)
        start = self._hybrid_from
        if start is not None and 0 <= k - start < self.periods * self.T:
            p, t = divmod(k - start, self.T)
            if t == 0 and self.cric is None:
                scores = saliency(self.index, x, d, self.weights)
                k_p = period_targets(self.target, self.periods)[p]
                self.active = choose(scores, self.index.modules, self.pruned, k_p)
            f[self.active] = (self.T - t - 1) / (self.T - t)
            if t == self.T - 1:
                self.pruned |= self.active
                self.active = torch.zeros_like(self.active)
        f[self.pruned] = 0.0
        return None, f

    def _cric_step(self, x, d, loss: float | None):
        """CRIC's part of :meth:`_schedule`: sample, charge and pick the next violating set."""
        if loss is None:
            raise ValueError(
                "HESSO with CRIC needs the loss of each step: call step(closure) or "
                "step(loss=loss)."
            )
        cfg, G = self.cric, len(self.units)
        assert cfg is not None  # only called with CRIC
        scores = saliency(self.index, x, d, self.weights)
        cyc = self._cycle
        if cyc is None:
            window = self._recent[-cfg.sampling_steps :] + [loss]
            ref = sum(window) / len(window)  # the loss before pruning, CRIC's L_0
            states = [copy.deepcopy(self.state[p]) for p in self.param_groups[0]["params"]]
            cyc = self._cycle = Cycle([t.clone() for t in x], states, ref, G)
            cyc.add(scores)
            cyc.begin(choose(scores, self.index.modules, self.pruned, self.target))
            return None, cyc.factors(cfg.sampling_steps)
        cyc.losses.append(loss)
        if cyc.t < cfg.sampling_steps:
            cyc.add(scores)
            return None, cyc.factors(cfg.sampling_steps)
        cyc.charge(cfg.loss_weight)
        lowest = choose(cyc.accumulated(), self.index.modules, self.pruned, self.target)
        new = lowest & ~cyc.tried
        if int(new.sum()) <= cfg.tolerance or cyc.cycles >= cfg.max_cycles:
            self.active, self._hybrid_from = lowest, self.n_steps
            _, f = self._schedule(x, d, None)
            return (cyc.x0, cyc.states), f
        cyc.begin(new)
        return (cyc.x0, cyc.states), cyc.factors(cfg.sampling_steps)

    def state_dict(self) -> dict:
        """The torch state plus the schedule: step count, pruned and shrinking groups, CRIC."""
        out = super().state_dict()
        cycle = None if self._cycle is None else copy.deepcopy(vars(self._cycle))
        out["hesso"] = {"n_steps": self.n_steps, "pruned": self.pruned.clone(),
                        "active": self.active.clone(), "hybrid_from": self._hybrid_from,
                        "recent": list(self._recent), "cycle": cycle}  # fmt: skip
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what :meth:`state_dict` saved (the same model, groups and settings).

        Raises:
            ValueError: a state dict without HESSO's schedule.
        """
        state_dict = dict(state_dict)
        extra = state_dict.pop("hesso", None)
        if extra is None:
            raise ValueError(
                "HESSO.load_state_dict: no 'hesso' entry (the pruning schedule); pass a "
                "state_dict saved by HESSO."
            )
        super().load_state_dict(state_dict)
        self.n_steps, self._hybrid_from = extra["n_steps"], extra["hybrid_from"]
        self.pruned, self.active = extra["pruned"].clone(), extra["active"].clone()
        self._recent, self._cycle = list(extra["recent"]), None
        if extra["cycle"] is not None:
            self._cycle = Cycle.__new__(Cycle)
            vars(self._cycle).update(copy.deepcopy(extra["cycle"]))

    # ------------------------------------------------------------------ the outcome

    @property
    def cric_steps(self) -> int:
        """Steps CRIC has taken before the final shrinking (0 without CRIC)."""
        if self.cric is None:
            return 0
        start = self.n_steps if self._hybrid_from is None else self._hybrid_from
        return max(start - self.start, 0)

    @property
    def finished(self) -> bool:
        """Whether the pruning schedule (CRIC included) is over."""
        start = self._hybrid_from
        return start is not None and self.n_steps >= start + self.periods * self.T

    def result(self) -> HessoResult:
        """The groups pruned so far and what removing them saves; see :class:`HessoResult`."""
        params = self.param_groups[0]["params"]
        norms = self.index.segment_sum([p.detach().abs() for p in params])
        units = tuple(u for u, gone in zip(self.units, self.pruned.tolist(), strict=True) if gone)
        removed = removed_params(
            self.units, self.pruned, dict(zip(self.index.names, params, strict=True))
        )
        tried = () if self._cycle is None else self._cycle.tried_units(self.units)
        return HessoResult(
            units=units,
            total_groups=len(self.units),
            zero_groups=int((norms == 0).sum()),
            group_sparsity=len(units) / len(self.units),
            removed_params=removed,
            total_params=self.total_params,
            finished=self.finished,
            steps=self.n_steps,
            cycles=0 if self._cycle is None else self._cycle.cycles,
            tried=tried,
        )


def _check(variant, lr, pruning_steps, periods, target, cric) -> None:
    """Refuse HESSO settings out of range (see the class's Raises)."""
    if variant not in VARIANTS:
        raise ValueError(f"HESSO: variant must be one of {VARIANTS}, got {variant!r}.")
    if not lr > 0:
        raise ValueError(f"HESSO: lr must be > 0, got {lr!r}.")
    if not (isinstance(periods, int) and 1 <= periods <= pruning_steps):
        raise ValueError(
            f"HESSO: pruning_periods must be an integer in [1, pruning_steps={pruning_steps}], "
            f"got {periods!r}."
        )
    if not 0 <= target < 1:
        raise ValueError(f"HESSO: target_group_sparsity must be in [0, 1), got {target}.")
    if cric is not None and (cric.sampling_steps < 1 or cric.max_cycles < 1):
        raise ValueError(f"HESSO: CRIC needs sampling_steps >= 1 and max_cycles >= 1, got {cric}.")
