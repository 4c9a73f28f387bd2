"""Exact mixed-precision bit allocation: a multiple-choice knapsack over the layers' widths."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ._layers import unknown
from .quantizer import check_bits
from .sensitivity import Sensitivity

COSTS = ("size", "bops")


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
        frontier: The optima at a sweep of budgets from the cheapest configuration to the
            dearest (Pareto-optimal; cost ascending, predicted Ω descending).
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
    r"""The multiple-choice knapsack: one width per group of tied layers, within a budget.

    Costs are integers: bits of the weights (``size``: :math:`n_i b`) or bit-operations
    (``bops``: :math:`\mathrm{MACs}_i\, b\, a`), divided by the greatest common divisor of
    all of them, ``unit``; the budget is compared with them in exact integer arithmetic.
    """

    def __init__(self, sens, bits, cost, fixed, tie, activation_bits):
        rows = {r.name: r for r in sens.layers}
        self.names, self.kind = sens.names, cost
        self.groups = _tied_groups(self.names, tie)
        self.widths, costs, self.omegas = [], [], []
        for group in self.groups:
            allowed = [{fixed[n]} if n in fixed else set(bits) for n in group]
            common = sorted(set.intersection(*allowed))
            if not common:
                raise ValueError(
                    f"allocate: tied layers {group} are fixed to different widths; fix them to "
                    "the same width or untie them."
                )
            self.widths.append(common)
            members = [rows[n] for n in group]
            costs.append([sum(_cost(r, b, cost, activation_bits) for r in members) for b in common])
            self.omegas.append(np.array([math.fsum(r.omega[b] for r in members) for b in common]))
        self.unit = math.gcd(*(c for group in costs for c in group)) or 1
        if sum(max(c) for c in costs) // self.unit >= 2**62:
            raise ValueError("allocate: the costs are too large for 64-bit integer arithmetic.")
        self.costs = [np.array([c // self.unit for c in group], dtype=np.int64) for group in costs]
        self.least = sum(int(c.min()) for c in self.costs)
        self.most = sum(int(c.max()) for c in self.costs)

    def capacity(self, budget: float) -> int:
        """The budget in units of ``unit``, rounded down in exact arithmetic.

        Clamped to ``[-1, most]``: a budget beyond the dearest configuration allows them all.
        """
        exact = Fraction(budget if isinstance(budget, numbers.Rational) else float(budget))
        units = math.floor(exact * (8 if self.kind == "size" else 1) / self.unit)
        return max(-1, min(units, self.most))

    def in_budget_units(self, units: int) -> float:
        """``units`` of ``unit`` in bytes or bit-operations."""
        return units * self.unit / (8 if self.kind == "size" else 1)

    def pareto(self, capacity: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Every configuration within ``capacity`` that no other beats in both cost and Ω.

        Group by group, the partial configurations are extended by each width and those that
        cannot be completed within ``capacity``, or that cost as much as another but have a
        larger Ω, are dropped. Returns the costs (ascending), the Ω (descending) and, per
        group, which extended configuration each kept one is (``parent * widths + width``).
        """
        after = np.cumsum([0] + [int(c.min()) for c in self.costs[:0:-1]])[::-1]
        cost, omega, trail = np.zeros(1, dtype=np.int64), np.zeros(1), []
        for c, w, rest in zip(self.costs, self.omegas, after, strict=True):
            C, W = (cost[:, None] + c).ravel(), (omega[:, None] + w).ravel()
            fits = np.flatnonzero(C <= capacity - rest)
            order = fits[np.lexsort((W[fits], C[fits]))]
            kept = order[_improves(W[order])]
            trail.append(kept)
            cost, omega = C[kept], W[kept]
        return cost, omega, trail

    def bits(self, trail: list[np.ndarray], j: int) -> dict[str, int]:
        """The widths of the configuration ``j`` of :meth:`pareto`'s result."""
        chosen: dict[str, int] = {}
        for g in reversed(range(len(self.groups))):
            j, k = divmod(int(trail[g][j]), len(self.widths[g]))
            chosen |= dict.fromkeys(self.groups[g], self.widths[g][k])
        return {n: chosen[n] for n in self.names}


def _improves(W: np.ndarray) -> np.ndarray:
    """Where ``W`` (ordered by cost) is below every earlier entry."""
    if not len(W):
        return np.zeros(0, dtype=bool)
    return np.concatenate(([True], W[1:] < np.minimum.accumulate(W)[:-1]))


def _tied_groups(names: list[str], tie: Sequence[Sequence[str]]) -> list[list[str]]:
    """Layers that must share a width (overlapping ties merged), each group in layer order."""
    root = {n: n for n in names}

    def find(n: str) -> str:
        while root[n] != n:
            n = root[n]
        return n

    for group in tie:
        for n in group[1:]:
            root[find(n)] = find(group[0])
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(find(n), []).append(n)
    return list(out.values())


def _cost(row, b: int, cost: str, activation_bits: int) -> int:
    """Bits of the weights (size) or bit-operations per sample (bops) at width ``b``."""
    return row.n_params * b if cost == "size" else row.macs * b * activation_bits


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

    the integer program of HAWQ-V3 (Yao et al. 2021, "HAWQ-V3: dyadic neural network
    quantization"), solved exactly by dynamic programming over Pareto sets (a multiple-choice
    knapsack): layer by layer, every partial configuration that no other beats in both cost
    and Ω is kept, and the answer is the one of least Ω within the budget. No solver
    tolerance enters: costs are integers (bits, or bit-operations) reduced by their greatest
    common divisor, the budget is compared with them exactly, and Ω is only summed and
    compared, so the result is the optimum up to float64 rounding of the sums, and never over
    the budget. The work grows with the number of Pareto-optimal partial configurations,
    which is at most the budget over that common divisor.
    ``cost="size"``: :math:`c_i(b) = n_i b / 8` bytes of the quantized weight matrices
    (biases and float layers not counted). ``cost="bops"``: :math:`c_i(b) = \mathrm{MACs}_i\,
    b\, a` bit-operations per sample with activations at ``activation_bits`` :math:`a`.
    Tied layers get the same width (overlapping ties are one group); fixed layers their given
    width. Negative sensitivities count as 0 (``sens.rule``).

    Args:
        sens: From :func:`hesse.quant.sensitivity`.
        budget: :math:`B` (bytes or bit-operations).
        cost: ``"size"`` or ``"bops"``.
        bits: Widths to choose from (default ``sens.bits``); each must be in ``sens.bits``.
        fixed: ``{layer: bits}`` widths imposed (e.g. ``{"head": 8}``).
        tie: Groups of layers that must share a width.
        activation_bits: :math:`a` for ``"bops"``.
        frontier: Budgets swept for the frontier (0: none).

    Returns:
        Allocation.

    Raises:
        ValueError: an unknown cost or layer name, widths not in ``sens.bits``, a non-finite
            budget or Ω, or a budget below the cheapest configuration (the message gives that
            smallest feasible budget).

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
    if not math.isfinite(budget):
        raise ValueError(f"allocate: budget must be a finite number, got {budget!r}.")
    bad = [r.name for r in sens.layers if not all(map(math.isfinite, r.omega.values()))]
    if bad:
        raise ValueError(
            f"allocate: layers {bad[:6]} have a non-finite Ω; check their sensitivity scores "
            "and errors (sens[name].score, .delta_sq)."
        )
    program = _Program(sens, bits, cost, fixed, tie, check_bits(activation_bits, "allocate"))
    costs, _, trail = program.pareto(program.capacity(budget))
    if not len(costs):
        unit = "bytes" if cost == "size" else "bit-operations per sample"
        raise ValueError(
            f"allocate: no configuration fits budget={budget:g} {unit}; the smallest feasible "
            f"budget is {program.in_budget_units(program.least):g} (every free layer at its "
            f"lowest width of {bits}, fixed and tied layers as given). Raise the budget or allow "
            "lower widths."
        )
    chosen = program.bits(trail, len(costs) - 1)  # the dearest that fits: the least Ω
    sweep = _frontier(program, sens, activation_bits, frontier) if frontier else ()
    return Allocation(
        chosen, *_totals(sens, chosen, activation_bits), cost, float(budget), activation_bits,
        sweep, sens.rule,
    )  # fmt: skip


def _totals(
    sens: Sensitivity, bits: dict[str, int], activation_bits: int
) -> tuple[float, float, float]:
    """Predicted Ω, bytes and bit-operations per sample of ``bits``."""
    rows = [(r, bits[r.name]) for r in sens.layers]
    return (
        math.fsum(r.omega[b] for r, b in rows),
        sum(r.n_params * b for r, b in rows) / 8,
        float(sum(r.macs * b * activation_bits for r, b in rows)),
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
    return _frontier(program, sens, 8, points, upper)


def _frontier(
    program: _Program, sens: Sensitivity, activation_bits: int, points: int, upper=None
) -> tuple[FrontierPoint, ...]:
    """The optima at ``points`` budgets from the cheapest configuration to ``upper``.

    ``upper`` defaults to the dearest configuration's cost. One :meth:`_Program.pareto` gives
    them all: the optimum at a budget is the dearest Pareto configuration within it.
    """
    top = program.most if upper is None else program.capacity(upper)
    costs, _, trail = program.pareto(top)
    picked = np.searchsorted(costs, np.linspace(program.least, top, max(points, 2)), "right") - 1
    out = []
    for j in sorted(set(picked[picked >= 0].tolist())):
        bits = program.bits(trail, j)
        predicted, size, bops = _totals(sens, bits, activation_bits)
        out.append(FrontierPoint(size if program.kind == "size" else bops, predicted, bits))
    return tuple(out)
