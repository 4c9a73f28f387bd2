r"""``hesse.bilevel.solve``: one entry point for the bilevel methods, one result with a trajectory.

The problem is described by two functions of ``(x, y, batch)`` (see ``_oracle``): any PyTorch
code works, e.g. ``torch.func.functional_call(model, unflatten(y), inputs)`` for a network whose
flat parameters are ``y``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ._oracle import Constraint, Fn, Oracle, Sampler
from .bsvr import BSVROptions, BSVRRun
from .implicit import ImplicitOptions, ImplicitRun
from .lvhba import LVHBAOptions, LVHBARun

OPTIONS: dict[str, type] = {"bsvr": BSVROptions, "lvhba": LVHBAOptions, "implicit": ImplicitOptions}
"""The methods and the class of their ``options``."""


@dataclass(frozen=True)
class Trajectory:
    r"""The run, sampled every ``log_every`` steps (and at the first and last).

    Attributes:
        steps: Step counts.
        upper: :math:`\frac1m\sum_i f(x, y_i)` on all data, at the current ``y`` (not at
            :math:`y^*(x)`: the single-loop methods never compute it).
        seconds: Wall time of the method up to then, without these evaluations.
        n_hvps: Second-order products up to then.
        n_grads: First-order gradients up to then.
        violation: LV-HBA's constraint violation :math:`\max(0, \max_j c_j(x, y))` (else
            empty).
    """

    steps: tuple[int, ...]
    upper: tuple[float, ...]
    seconds: tuple[float, ...]
    n_hvps: tuple[int, ...]
    n_grads: tuple[int, ...]
    violation: tuple[float, ...] = ()


@dataclass(frozen=True)
class BilevelResult:
    r"""The hyperparameters and parameters a bilevel method reached, and how it got there.

    Attributes:
        hparams: :math:`x`, shaped like the input.
        params: :math:`y` (``(m, *shape)`` with blocks, else the input's shape).
        method: ``"bsvr"``, ``"lvhba"`` or ``"implicit"``.
        options: The options it ran with.
        upper_value: The last value of ``trajectory.upper``.
        trajectory: Trajectory.
        n_hvps: Second-order products (``lvhba``: 0, it is Hessian-free).
        n_grads: First-order gradients of the upper or lower function.
        seconds: Wall time, evaluations for the trajectory excluded.
        ihvp: The products :math:`(\nabla^2_{yy} g_i)^{-1} \nabla_y f_i` the method holds at
            the end (``bsvr``: tracked; ``implicit``: CG's), shaped like ``params``; None for
            ``lvhba``.
        violation: ``lvhba``: the constraint violation at the end; else None.
        solves_converged: ``implicit``: whether every CG solve met ``tol`` (else None).
        max_residual: ``implicit``: the largest relative CG residual (else None).
    """

    hparams: torch.Tensor
    params: torch.Tensor
    method: str
    options: Any
    upper_value: float
    trajectory: Trajectory
    n_hvps: int
    n_grads: int
    seconds: float
    ihvp: torch.Tensor | None = None
    violation: float | None = None
    solves_converged: bool | None = None
    max_residual: float | None = None


def solve(
    upper: Fn,
    lower: Fn,
    hparams: torch.Tensor,
    params: torch.Tensor,
    *,
    method: str = "bsvr",
    steps: int = 100,
    options: Any = None,
    data: Sampler | None = None,
    blocks: int = 1,
    constraint: Constraint | None = None,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
    log_every: int | None = None,
    progress: bool = False,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> BilevelResult:
    r"""Minimize :math:`F(x) = \frac1m\sum_i f(x, y_i^*(x))` over the hyperparameters ``x``.

    .. math::
        \min_x \frac1m \sum_{i=1}^m f(x, y_i^*(x); \xi_i), \qquad
        y_i^*(x) = \arg\min_{y:\, c(x, y) \le 0} g(x, y; \zeta_i).

    - ``"bsvr"``: BSVRB (Hu, Zhu & Yang 2023): single loop, blocks and mini-batches sampled,
      :math:`(\nabla^2_{yy} g_i)^{-1}\nabla_y f_i` tracked by Hessian-vector products with
      variance-reduced estimators; see :mod:`hesse.bilevel.bsvr`.
    - ``"lvhba"``: LV-HBA (Yao, Yu, Zeng & Zhang 2024): single loop, gradients only, for a lower
      level with constraints :math:`c(x, y) \le 0`; see :mod:`hesse.bilevel.lvhba`.
    - ``"implicit"``: inner gradient steps, CG on the lower Hessian, exact-formula
      hypergradient on all data; see :mod:`hesse.bilevel.implicit`.

    Args:
        upper: ``upper(x, y, batch) -> scalar``, :math:`f`.
        lower: ``lower(x, y, batch) -> scalar``, :math:`g`, strongly convex in ``y`` (convex
            for ``"lvhba"``).
        hparams: :math:`x`, any shape (float64 for tests against closed forms).
        params: Starting :math:`y`: ``(m, *shape)`` when ``blocks=m > 1``, else any shape.
        method: ``"bsvr"``, ``"lvhba"`` or ``"implicit"``.
        steps: Outer iterations.
        options: ``BSVROptions``, ``LVHBAOptions`` or ``ImplicitOptions`` (default: that class's
            defaults).
        data: ``data(i, generator) -> (upper_batch, lower_batch)`` for block ``i``: a mini-batch
            drawn with ``generator``, or all of block ``i``'s data when it is None (used by
            ``"implicit"`` and for the trajectory). None: both functions get ``batch=None``.
        blocks: :math:`m`, the number of lower-level problems.
        constraint: ``constraint(x, y) -> (l,)``, feasible where ``<= 0`` (``"lvhba"`` only).
        project: Projection of ``x`` onto its feasible set (default: none).
        seed: Seed of the block and mini-batch sampling.
        log_every: Steps between trajectory points (default ``max(1, steps // 50)``).
        progress: Show a tqdm bar.
        callback: ``callback(step, hparams, params)`` at each trajectory point.

    Returns:
        BilevelResult.

    Raises:
        ValueError: An unknown method, options of another method, ``params`` without the
            ``blocks`` axis, a constraint with a method that ignores it, or a function that
            does not return a scalar.
        FloatingPointError: A non-finite value of ``upper`` or ``lower`` (steps too large).

    Example:
        >>> x0, y0 = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
        >>> upper = lambda x, y, b: 0.5 * ((y - 1) ** 2).sum() + 0.5 * (x**2).sum()
        >>> lower = lambda x, y, b: 0.5 * ((y - x) ** 2).sum()
        >>> r = solve(upper, lower, x0, y0, method="implicit", steps=60)
        >>> r.hparams  # F(x) = ||x - 1||^2 / 2 + ||x||^2 / 2 is minimal at x = 1/2
        tensor([0.5000, 0.5000], dtype=torch.float64)
    """
    options = _options(method, options)
    _check(method, hparams, params, blocks, constraint)
    Y = params.detach().clone() if blocks > 1 else params.detach().clone()[None]
    oracle = Oracle(upper, lower, data, blocks)
    gen = torch.Generator().manual_seed(seed)
    proj = project or (lambda x: x)
    x = hparams.detach().clone()
    start = time.perf_counter()
    if method == "bsvr":
        run: Any = BSVRRun(oracle, x, Y, options, gen, proj)
    elif method == "lvhba":
        run = LVHBARun(oracle, x, Y, options, gen, proj, constraint)
    else:
        run = ImplicitRun(oracle, x, Y, options, gen, proj)
    log = _Log(oracle, run, method == "lvhba", time.perf_counter() - start, callback, blocks)
    every = log_every or max(1, steps // 50)
    log.record(0)
    for t in _steps(steps, progress):
        tick = time.perf_counter()
        run.step()
        log.seconds += time.perf_counter() - tick
        if (t + 1) % every == 0 or t + 1 == steps:
            log.record(t + 1)
    return _result(method, options, run, log, blocks, params.shape)


def _options(method: str, options: Any) -> Any:
    """The options of ``method`` (its defaults for None); refuse another method's."""
    if method not in OPTIONS:
        raise ValueError(f"bilevel.solve: method must be one of {tuple(OPTIONS)}, got {method!r}.")
    cls = OPTIONS[method]
    if options is None:
        return cls()
    if not isinstance(options, cls):
        raise ValueError(
            f"bilevel.solve(method={method!r}) takes options={cls.__name__}(...), got "
            f"{type(options).__name__}."
        )
    return options


def _check(method, hparams, params, blocks, constraint) -> None:
    """Refuse inputs that :func:`solve` cannot run (see its Raises)."""
    if not (torch.is_tensor(hparams) and torch.is_tensor(params)):
        raise ValueError(
            f"bilevel.solve: hparams and params must be tensors, got {type(hparams).__name__} "
            f"and {type(params).__name__}; convert them with torch.as_tensor(...)."
        )
    if blocks < 1 or (blocks > 1 and (params.dim() == 0 or params.shape[0] != blocks)):
        raise ValueError(
            f"bilevel.solve: with blocks={blocks}, params must have shape ({blocks}, ...) (one "
            f"row per lower-level problem), got {tuple(params.shape)}."
        )
    if not (hparams.is_floating_point() and params.is_floating_point()):
        raise ValueError(
            f"bilevel.solve: hparams and params must be floating-point tensors, got "
            f"{hparams.dtype} and {params.dtype}; convert them with .double() or .float()."
        )
    if constraint is not None and method != "lvhba":
        raise ValueError(
            f"bilevel.solve(method={method!r}) has no lower-level constraints; use "
            "method='lvhba' for a constrained lower level."
        )


def _steps(steps: int, progress: bool):
    """``range(steps)``, with a tqdm bar when ``progress``."""
    if not progress:
        return range(steps)
    from tqdm.auto import trange

    return trange(steps, desc="bilevel")


class _Log:
    """Trajectory points, evaluated outside the timed steps."""

    def __init__(self, oracle, run, violation: bool, seconds, callback, blocks):
        self.o, self.run, self.has_violation, self.seconds = oracle, run, violation, seconds
        self.callback, self.blocks = callback, blocks
        self.rows: list[tuple] = []

    def record(self, step: int) -> None:
        """Evaluate and keep one trajectory point; call the user's callback."""
        val = self.o.value(self.run.x, self.run.Y)
        vio = self.run.violation() if self.has_violation else None
        self.rows.append((step, val, self.seconds, self.o.n_hvps, self.o.n_grads, vio))
        if self.callback is not None:
            self.callback(step, self.run.x, self.run.Y if self.blocks > 1 else self.run.Y[0])

    def trajectory(self) -> Trajectory:
        steps, upper, seconds, hvps, grads, vio = (tuple(c) for c in zip(*self.rows, strict=True))
        return Trajectory(steps, upper, seconds, hvps, grads, vio if self.has_violation else ())


def _result(method, options, run, log: _Log, blocks: int, shape) -> BilevelResult:
    """The :class:`BilevelResult` of a finished run, ``params`` back in the input's shape."""
    traj = log.trajectory()
    unblock = (lambda T: T) if blocks > 1 else (lambda T: T[0].reshape(shape))
    is_implicit = method == "implicit"
    return BilevelResult(
        hparams=run.x,
        params=unblock(run.Y),
        method=method,
        options=options,
        upper_value=traj.upper[-1],
        trajectory=traj,
        n_hvps=log.o.n_hvps,
        n_grads=log.o.n_grads,
        seconds=log.seconds,
        ihvp=None if method == "lvhba" else unblock(run.U),
        violation=traj.violation[-1] if traj.violation else None,
        solves_converged=run.all_converged if is_implicit else None,
        max_residual=run.max_residual if is_implicit else None,
    )
