"""Exact mixed-precision bit allocation: an integer linear program over the layers' widths."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from ._layers import unknown
from .quantizer import check_bits
from .sensitivity import Sensitivity

COSTS = ("size", "bops")
_SLACK = 1e-9  # relative: HiGHS's feasibility tolerance must not let a solution over the budget


@dataclass(frozen=True)
class FrontierPoint:
    """One Pareto-optimal configuration: its cost, predicted Ω and widths."""

    cost: float
    predicted: float
    bits: dict[str, int]


@dataclass(frozen=True)
class Allocation:
    r"""The chosen widths and what they cost.

    Attributes:
        bits: ``{layer: bits}``, for :func:`hesse.quant.quantize`.
        predicted: :math:`\sum_i \Omega_i(b_i)`.
        size_bytes: Bytes of the quantized weight matrices, :math:`\sum_i n_i b_i / 8`.
        bops: Bit-operations per sample, :math:`\sum_i \mathrm{MACs}_i\, b_i\, a`.
        cost: ``"size"`` or ``"bops"``, what ``budget`` bounds.
        budget: The bound.
        activation_bits: :math:`a`, the activation width counted in ``bops``.
        frontier: The Pareto set (cost ascending, predicted Ω descending) over a sweep of
            budgets from the cheapest configuration to the dearest.
        rule: How negative sensitivities were treated.
    """

    bits: dict[str, int]
    predicted: float
    size_bytes: float
    bops: float
    cost: str
    budget: float
    activation_bits: int
    frontier: tuple[FrontierPoint, ...]
    rule: str


class _Program:
    """The 0-1 program: variable ``x[i, j]`` chooses width ``choices[i][j]`` for layer ``i``."""

    def __init__(self, sens, bits, cost, fixed, tie, activation_bits):
        self.names = sens.names
        self.choices = [list(bits) for _ in self.names]
        for name, b in fixed.items():
            self.choices[self.names.index(name)] = [b]
        rows = {r.name: r for r in sens.layers}
        self.omega, self.size, self.bops = [], [], []
        for name, choice in zip(self.names, self.choices, strict=True):
            r = rows[name]
            self.omega += [r.omega[b] for b in choice]
            self.size += [r.n_params * b / 8 for b in choice]
            self.bops += [r.macs * b * activation_bits for b in choice]
        self.cost = self.size if cost == "size" else self.bops
        self.index = [(i, b) for i, choice in enumerate(self.choices) for b in choice]
        self.rows, self.rhs = [], []  # equality constraints
        for i in range(len(self.names)):  # one width per layer
            self._equal({(i, b): 1.0 for b in self.choices[i]}, 1.0)
        for group in tie:
            self._tie([self.names.index(n) for n in group])

    def _equal(self, coefficients: dict[tuple[int, int], float], rhs: float) -> None:
        self.rows.append([coefficients.get(key, 0.0) for key in self.index])
        self.rhs.append(rhs)

    def _tie(self, layers: list[int]) -> None:
        """One width for all ``layers``: one a member is fixed to, else any they all allow."""
        first, *others = layers
        common = set(self.choices[first]).intersection(*(self.choices[i] for i in others))
        if not common:
            names = [self.names[i] for i in layers]
            raise ValueError(
                f"allocate: tied layers {names} are fixed to different widths; fix them to the "
                "same width or untie them."
            )
        for i in layers:
            for b in set(self.choices[i]) - common:
                self._equal({(i, b): 1.0}, 0.0)
        for other in others:
            for b in sorted(common):
                self._equal({(first, b): 1.0, (other, b): -1.0}, 0.0)

    def solve(self, objective: Sequence[float], budget: float | None) -> np.ndarray | None:
        """The optimal 0-1 vector, or None when infeasible."""
        constraints = [LinearConstraint(np.array(self.rows), self.rhs, self.rhs)]
        if budget is not None:
            scale = max(abs(budget), 1.0)  # HiGHS's tolerances are absolute: bring B to 1
            row = np.array(self.cost)[None] / scale
            constraints.append(LinearConstraint(row, -np.inf, budget / scale * (1 + _SLACK)))
        c = np.asarray(objective, dtype=float)
        c = c / max(np.abs(c).max(), np.finfo(float).tiny)  # HiGHS's gap tolerances: scale to 1
        res = milp(
            c,
            constraints=constraints,
            integrality=np.ones(len(c)),
            bounds=Bounds(0, 1),
            options={"mip_rel_gap": 0.0, "presolve": False},
        )
        return None if res.x is None else np.round(res.x)

    def bits(self, x: np.ndarray) -> dict[str, int]:
        return {self.names[i]: b for (i, b), v in zip(self.index, x, strict=True) if v > 0.5}

    def total(self, values: Sequence[float], x: np.ndarray) -> float:
        return float(np.dot(values, x))


def allocate(
    sens: Sensitivity,
    budget: float,
    *,
    cost: str = "size",
    bits: Sequence[int] | None = None,
    fixed: Mapping[str, int] | None = None,
    tie: Sequence[Sequence[str]] = (),
    activation_bits: int = 8,
    frontier: int = 16,
) -> Allocation:
    r"""The widths that minimise the predicted loss increase under a budget, exactly.

    .. math::
        \min_{x} \sum_{i,b} \Omega_i(b)\, x_{ib} \quad\text{s.t.}\quad
        \sum_b x_{ib} = 1,\; \sum_{i,b} c_i(b)\, x_{ib} \le B,\; x_{ib} \in \{0, 1\},

    solved by ``scipy.optimize.milp`` (HiGHS branch and bound: the optimum, not a heuristic),
    as HAWQ-V3 does (Yao et al. 2021, "HAWQ-V3: dyadic neural network quantization").
    ``cost="size"``: :math:`c_i(b) = n_i b / 8` bytes of the quantized weight matrices
    (biases and float layers not counted). ``cost="bops"``: :math:`c_i(b) = \mathrm{MACs}_i\,
    b\, a` bit-operations per sample with activations at ``activation_bits`` :math:`a`.
    Tied layers get the same width; fixed layers their given width. Negative sensitivities
    count as 0 (``sens.rule``).

    Args:
        sens: From :func:`hesse.quant.sensitivity`.
        budget: :math:`B` (bytes or bit-operations).
        cost: ``"size"`` or ``"bops"``.
        bits: Widths to choose from (default ``sens.bits``); each must be in ``sens.bits``.
        fixed: ``{layer: bits}`` widths imposed (e.g. ``{"head": 8}``).
        tie: Groups of layers that must share a width.
        activation_bits: :math:`a` for ``"bops"``.
        frontier: Budgets swept for the Pareto set (0: none).

    Returns:
        Allocation.

    Raises:
        ValueError: an unknown cost or layer name, widths not in ``sens.bits``, or a budget
            below the cheapest configuration (the message gives that smallest feasible budget).

    Example:
        >>> from hesse.quant.sensitivity import LayerSensitivity, Sensitivity
        >>> from hesse.quant import Quantizer
        >>> rows = tuple(LayerSensitivity(n, n, 8, 8, 1.0, False, {2: e, 4: e / 10},
        ...                               {2: e, 4: e / 10}) for n, e in (("a", 1.0), ("b", 5.0)))
        >>> sens = Sensitivity("trace", (2, 4), rows, Quantizer(), "hessian", 0)
        >>> allocate(sens, budget=6).bits  # 6 bytes: one layer at 4 bits, the sensitive one
        {'a': 2, 'b': 4}
    """
    if cost not in COSTS:
        raise ValueError(f"allocate: cost must be one of {COSTS}, got {cost!r}.")
    bits = _widths(sens, bits if bits is not None else sens.bits, "bits")
    fixed = dict(fixed or {})
    for name, b in fixed.items():
        if name not in sens.names:
            raise ValueError(unknown(name, sens.names))
        _widths(sens, [b], f"fixed[{name!r}]")
    for group in tie:
        for name in group:
            if name not in sens.names:
                raise ValueError(unknown(name, sens.names))
    program = _Program(sens, bits, cost, fixed, tie, check_bits(activation_bits, "allocate"))
    x = program.solve(program.omega, budget)
    if x is None:
        least = program.total(program.cost, program.solve(program.cost, None))
        unit = "bytes" if cost == "size" else "bit-operations per sample"
        raise ValueError(
            f"allocate: no configuration fits budget={budget:g} {unit}; the smallest feasible "
            f"budget is {least:g} (every free layer at its lowest width of {bits}, fixed and "
            "tied layers as given). Raise the budget or allow lower widths."
        )
    sweep = _frontier(program, frontier) if frontier else ()
    return Allocation(
        program.bits(x),
        program.total(program.omega, x),
        program.total(program.size, x),
        program.total(program.bops, x),
        cost,
        float(budget),
        activation_bits,
        sweep,
        sens.rule,
    )


def _widths(sens: Sensitivity, bits: Sequence[int], what: str) -> tuple[int, ...]:
    out = tuple(sorted({check_bits(b, "allocate") for b in bits}))
    extra = [b for b in out if b not in sens.bits]
    if extra:
        raise ValueError(
            f"allocate: {what} has widths {extra} that the sensitivity was not measured for "
            f"(sens.bits = {sens.bits}); add them to sensitivity(bits=...)."
        )
    return out


def frontier(
    sens: Sensitivity, upper: float, *, cost: str, bits: Sequence[int], points: int
) -> tuple[FrontierPoint, ...]:
    """The Pareto set of Ω-optimal allocations at ``points`` budgets up to ``upper``."""
    program = _Program(sens, _widths(sens, bits, "bits"), cost, {}, [], 8)
    return _frontier(program, points, upper)


def _frontier(
    program: _Program, points: int, upper: float | None = None
) -> tuple[FrontierPoint, ...]:
    """Pareto set of (cost, Ω) over ``points`` budgets from the cheapest to ``upper``.

    ``upper`` defaults to the dearest configuration's cost.
    """
    least = program.total(program.cost, program.solve(program.cost, None))
    most = program.total(program.cost, program.solve([-c for c in program.cost], None))
    most = most if upper is None else upper
    found = {}
    for budget in np.linspace(least, most, max(points, 2)):
        x = program.solve(program.omega, float(budget))
        found[tuple(x)] = (program.total(program.cost, x), program.total(program.omega, x))
    out, best = [], np.inf
    for key, (c, w) in sorted(found.items(), key=lambda kv: (kv[1][0], kv[1][1])):
        if w < best:
            out.append(FrontierPoint(c, w, program.bits(np.array(key))))
            best = w
    return tuple(out)
