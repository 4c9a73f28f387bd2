"""The shell shared by the curvature optimizers: closure, accumulation, probes, state."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import _closure


class CurvatureOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose update uses a Hessian-diagonal estimate.

    Subclasses give ``_update(p, g, estimate, state, group) -> (new_p, new_state)`` (a pure
    update from :mod:`hesse.optim.updates`) and ``_transform(estimate, p)``. The estimate is
    refreshed on steps ``0, update_every, 2 update_every, ...``; between refreshes ``estimate``
    is None. A parameter that no micro-batch's loss reaches has no gradient and is skipped, as
    in ``torch.optim``: no update (weight decay and momentum included) and no state.

    Two ways to take a step:

    - ``opt.step(closure)``: the closure returns the loss (``(loss, logits)`` for estimators
      that need logits) without calling ``backward``; the optimizer differentiates it.
    - gradient accumulation: ``opt.accumulate(loss)`` (or ``accumulate(loss, logits)``) once
      per micro-batch, then ``opt.step()``. Gradients and the estimate's contributions are
      summed, with the same probes for every micro-batch of the step, and each micro-batch's
      graph is freed at once. (A closure replaces whatever was accumulated.)
    """

    def __init__(self, params, defaults: dict, *, estimator, update_every: int, seed: int):
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}.")
        super().__init__(params, defaults)
        self.estimator, self.update_every = estimator, int(update_every)
        self.generator = torch.Generator().manual_seed(seed)
        self.n_steps = 0
        self._pending = _Pending()

    @property
    def estimate_due(self) -> bool:
        """Whether the coming step refreshes the Hessian-diagonal estimate."""
        return self.n_steps % self.update_every == 0

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def accumulate(self, loss: torch.Tensor, logits: torch.Tensor | None = None) -> None:
        """Add one micro-batch: its gradient, and its share of the estimate when one is due.

        Args:
            loss: The micro-batch's loss (scaled as it should count in the step, e.g. divided
                by the number of micro-batches), not yet differentiated.
            logits: Its logits ``(..., classes)``, for estimators that need them.

        Raises:
            ValueError: logits missing for an estimator that needs them, or a loss that was
                already differentiated.
        """
        who = type(self).__name__
        due, est = self.estimate_due, self.estimator
        if due and est.needs_logits and logits is None:
            raise ValueError(
                f"{who}: {type(est).__name__} needs the logits: pass accumulate(loss, logits), "
                "or a closure that returns (loss, logits)."
            )
        params = self._params()
        grads = _closure.gradients(
            loss,
            params,
            who,
            create_graph=due and est.needs_graph,
            retain_graph=due and est.needs_logits,
        )
        pending = self._pending
        pending.add_grads(grads)
        if due:
            if pending.probes is None:
                pending.probes = est.draw(params, self.generator)
            share = est.contribution(pending.probes, params, grads, logits, self.generator)
            pending.add_estimate(share, 0 if logits is None else logits[..., 0].numel())

    # torch's stub types the closure's loss as a float; it is a tensor, as in torch.optim
    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """One step: from ``closure`` (see the class), or from what ``accumulate`` gathered.

        Returns:
            The closure's loss, detached (None without a closure).

        Raises:
            ValueError: neither a closure nor accumulated micro-batches, or a closure that
                does not return a scalar loss (or ``(loss, logits)`` when logits are needed).
        """
        loss = None
        if closure is not None:
            self._pending = _Pending()
            wants_logits = self.estimator.needs_logits
            loss, logits = _closure.call(closure, type(self).__name__, logits=wants_logits)
            with torch.enable_grad():
                self.accumulate(loss, logits)
        self._apply(self._pending)
        self._pending = _Pending()
        self.n_steps += 1
        return None if loss is None else loss.detach()

    def _apply(self, pending: _Pending) -> None:
        if pending.grads is None:
            raise ValueError(
                f"{type(self).__name__}.step: no gradient; pass a closure, or call "
                "accumulate(loss) for each micro-batch before step()."
            )
        estimate = None
        if self.estimate_due:
            estimate = self.estimator.finish(pending.estimate, pending.rows)
        live = [
            (p, group) for group in self.param_groups for p in group["params"] if p.requires_grad
        ]
        for i, ((p, group), g) in enumerate(zip(live, pending.grads, strict=True)):
            if g is None:  # as torch.optim: no gradient, no update and no state
                continue
            d = None if estimate is None else self._transform(estimate[i], p)
            new_p, self.state[p] = self._update(p, g, d, self.state[p], group)
            p.copy_(new_p)

    def _transform(self, estimate: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return estimate

    def _update(self, p, g, estimate, state: dict, group: dict):
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The torch state plus the probe generator's state and the step count."""
        out = super().state_dict()
        out["hesse"] = {"generator": self.generator.get_state(), "n_steps": self.n_steps}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what :meth:`state_dict` saved, the generator included."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("hesse", None)
        if extra is None:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: no 'hesse' entry (probe generator and "
                "step count); pass a state_dict saved by this optimizer class."
            )
        super().load_state_dict(state_dict)
        self.generator.set_state(extra["generator"])
        self.n_steps = int(extra["n_steps"])


class _Pending:
    """What the micro-batches of the coming step have added up so far."""

    def __init__(self) -> None:
        self.grads: list[torch.Tensor | None] | None = None
        self.estimate: list[torch.Tensor] | None = None
        self.probes = None
        self.rows = 0

    def add_grads(self, grads) -> None:
        g = [None if gi is None else gi.detach() for gi in grads]
        if self.grads is not None:
            g = [_plus(a, b) for a, b in zip(self.grads, g, strict=True)]
        self.grads = g

    def add_estimate(self, share, rows: int) -> None:
        self.rows += rows
        self.estimate = (
            share
            if self.estimate is None
            else [a + b for a, b in zip(self.estimate, share, strict=True)]
        )


def _plus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """``a + b``, where None (no gradient in that micro-batch) adds nothing."""
    if a is None or b is None:
        return b if a is None else a
    return a + b
