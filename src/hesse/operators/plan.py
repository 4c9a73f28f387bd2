"""The memory plan of a run: what the Krylov bases, the kept graphs and the products will take.

The big allocations of an analysis are few and predictable: the Lanczos basis of ``eigs``
(``ncv + 1`` float64 vectors of the parameter dimension ``d``), the stochastic Lanczos
quadrature of ``density`` (``steps + 1`` float64 vectors per probe processed together), the
per-batch graphs that the curvature operators keep between products, the widest block of
columns pushed through the model at once, and, for a Kronecker curvature, its factors.
:func:`plan` measures the one unknown (the graph of one batch, by building it once) and adds
the rest up, before any product runs; with ``max_memory`` it chooses the probe group and
block size that fit, or refuses.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, overload

import torch

from ..problem._gather import planned_units
from ..problem._positions import sample_count
from ..problem.calibration import CalibrationMemory, plan_calibration
from ..problem.objective import Objective
from ._cache import AUTO_CACHE_FRACTION
from ._kfac_layers import factor_shapes, find_groups, matrix_shape
from ._kfac_shard import full_shapes
from ._memory import auto_basis_dtype, available_bytes, probe_group, storages
from ._memory import format_bytes as _size
from .gauss_newton import FisherOperator, GGNOperator
from .hessian import HessianOperator
from .kfac import MAX_DENSE, EKFACOperator, KFACOperator

BLOCK_FACTOR = 4
"""Copies of a ``(d, block_size)`` block alive during a product: the input, its per-parameter
split, the per-column results and their concatenation."""

# A Kronecker curvature's products need no graph, but a run measures it against the exact GGN
# (``curvature_gap``, the report's gap section), whose graphs it keeps.
_OPERATORS = {
    "hessian": HessianOperator,
    "ggn": GGNOperator,
    "fisher": FisherOperator,
    "kfac": GGNOperator,
    "ekfac": GGNOperator,
}
EIGH_ENTRIES = 4
"""float64 ``n x n`` arrays alive while EKFAC decomposes a factor of size ``n``: its float64
copy, the eigenvectors and LAPACK's workspace (about ``2 n^2`` for ``syevd``)."""


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a run will hold at its peak, item by item, and the settings chosen to fit.

    Attributes:
        dim: Parameters analysed ``d``.
        samples: Samples of this process's data (dim 0 of each batch).
        batches: Batches of this process's data.
        curvature: ``"hessian"``, ``"ggn"``, ``"fisher"``, ``"kfac"`` or ``"ekfac"`` (these two
            keep the GGN's graphs, for the gap to the exact GGN).
        k: Eigenpairs ``eigs`` computes.
        ncv: Lanczos basis size of ``eigs`` (its default ``max(2k + 1, 20)``, at most ``d``).
        steps: Lanczos steps per probe of ``density`` (at most ``d``).
        probes: Probes of ``density``.
        group: Probes that ``density`` processes together (its default, or chosen to fit).
        block_size: Most columns per product pushed through the model at once (chosen to fit).
        keep_graphs: Whether the per-batch graphs fit and are kept between products.
        max_cache_bytes: What to pass to the operator: the kept graphs' bytes, or 0.
        basis_bytes: the vectors of ``eigs`` at its peak, in ``basis_dtype`` (8 bytes shown):
            ``(ncv + 3) * d * 8`` for ``k = 1``, ``(ncv + max(k + 3, 6)) * d * 8`` for
            ``k > 1`` (the basis, the block start, the ``k`` locked or returned vectors, and
            the block being multiplied).
        probes_bytes: ``(steps + 1) * group * d * 8``, the float64 bases of ``density``.
        graph_bytes: One batch's graph (measured on the first batch).
        graphs_bytes: The kept graphs, ``graph_bytes * batches``; one batch's when not kept.
        block_bytes: ``BLOCK_FACTOR * block_size * d * itemsize``, the widest product.
        factor_bytes: A Kronecker curvature's factors (0 for the others):
            ``KFACOperator.factor_bytes``; for EKFAC its ``factor_bytes``, plus KFAC's factors
            that it is built from, plus the float64 eigendecomposition of its largest factor
            (``EIGH_ENTRIES * 8 * n^2``).
        largest_factor: The largest factor, e.g. ``"layer lm_head: output factor 50,257 x
            50,257 (10.1 GB)"`` (``""`` when there are none).
        total_bytes: The sum of the items above.
        available_bytes: Memory free on the device when the plan was made.
        max_memory: The cap the plan was fitted to (None: no cap).
        fits: ``total_bytes`` is within ``max_memory`` (or within the free memory if None).
        gathered_bytes: Under FSDP (parameters sharded across processes), the largest FSDP
            unit's full parameters, which the data pass gathers while the unit runs
            (``itemsize`` times its entries; 0 otherwise). Everything is per process:
            ``dim``, the bases and ``block_bytes`` are the local shard's (columns and products
            stay local), and the graphs hold the gathered weights their operations saved.
        basis_dtype: The dtype of the ``eigs`` basis planned; pass it to ``eigs``.
    """

    dim: int
    samples: int
    batches: int
    curvature: str
    k: int
    ncv: int
    steps: int
    probes: int
    group: int
    block_size: int
    keep_graphs: bool
    max_cache_bytes: int
    basis_bytes: int
    probes_bytes: int
    graph_bytes: int
    graphs_bytes: int
    block_bytes: int
    factor_bytes: int
    largest_factor: str
    total_bytes: int
    available_bytes: int
    max_memory: int | None
    fits: bool
    gathered_bytes: int = 0
    basis_dtype: torch.dtype = torch.float64

    def __str__(self) -> str:
        graphs = "kept" if self.keep_graphs else "not kept: one batch at a time"
        cap = "" if self.max_memory is None else f" of max {_size(self.max_memory)}"
        batches = f"{self.batches:,} batch{'es' * (self.batches != 1)}"
        factors = f", factors {_size(self.factor_bytes)}" if self.largest_factor else ""
        return (
            f"plan: d={self.dim:,} params, {self.samples:,} samples in {batches}; "
            f"memory ~ {_size(self.total_bytes)}{cap} (basis {_size(self.basis_bytes)}, "
            f"probes {_size(self.probes_bytes)}, graphs {_size(self.graphs_bytes)} "
            f"[{graphs}], block {_size(self.block_bytes)}{factors}); group={self.group}, "
            f"block_size={self.block_size}"
            + ("" if self.fits else f"; does NOT fit ({_size(self.available_bytes)} free)")
        )

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain numbers (the basis dtype as its name), for a report."""
        return asdict(self) | {"basis_dtype": str(self.basis_dtype).removeprefix("torch.")}


class MemoryPlanError(ValueError):
    """A run that cannot fit ``max_memory``; ``.plan`` is the smallest plan tried."""

    def __init__(self, message: str, plan: MemoryPlan):
        super().__init__(message)
        self.plan = plan


@overload
def plan(
    objective: Objective,
    *,
    k: int = 6,
    ncv: int | None = None,
    steps: int = 80,
    probes: int = 10,
    group: int | None = None,
    block_size: int = 32,
    max_memory: int | None = None,
    curvature: str = "hessian",
    world_size: int | None = None,
    basis_dtype: torch.dtype | None = None,
    compress: None = None,
) -> MemoryPlan: ...
@overload
def plan(objective: Objective, *, compress: str, sequential: bool = True) -> CalibrationMemory: ...
def plan(
    objective: Objective,
    *,
    k: int = 6,
    ncv: int | None = None,
    steps: int = 80,
    probes: int = 10,
    group: int | None = None,
    block_size: int = 32,
    max_memory: int | None = None,
    curvature: str = "hessian",
    world_size: int | None = None,
    basis_dtype: torch.dtype | None = None,
    compress: str | None = None,
    sequential: bool = True,
) -> MemoryPlan | CalibrationMemory:
    r"""The memory a run of ``eigs`` and ``density`` on a curvature of ``objective`` will take.

    .. math::
        M = \underbrace{(n_{cv}+\max(k+3, 6))\,d\,8}_{\text{eigs basis}}
          + \underbrace{(s+1)\,g\,d\,8}_{\text{density}}
          + \underbrace{B\,m_{\text{graph}}}_{\text{kept graphs}}
          + \underbrace{4\,b\,d\,\text{itemsize}}_{\text{widest product}}
          + \underbrace{m_{\text{factors}}}_{\text{KFAC, EKFAC}}

    for ``d`` parameters, ``B`` batches whose graphs take :math:`m_{\text{graph}}` each
    (measured on the first batch: one forward and backward pass), ``s`` steps, a probe group
    ``g`` and a block of ``b`` columns. The items are not all alive at once (``eigs`` and
    ``density`` run one after the other), so ``M`` is an upper bound of the peak.

    ``curvature="kfac"`` or ``"ekfac"`` adds the Kronecker factors, counted from the layer
    shapes without building them (:attr:`MemoryPlan.factor_bytes`), and the graphs are the
    GGN's (the gap to the exact GGN is measured with its products). No setting shrinks the
    factors: a plan they do not fit is refused, naming the largest (a 50k-token LM head's
    output factor is 10 GB in float32).

    Without ``group`` the probe group is the one ``density`` takes by default: as many probes as
    fit in ``GROUP_BYTES`` (1 GiB) of basis, at least one. Without ``max_memory`` the
    graphs are planned as kept when they fit the operators' default cache cap (half of the free
    memory), and ``block_size`` is taken as given. With ``max_memory`` the largest settings that
    fit are chosen, in this order: the probe group is halved (unless ``group`` is given), then
    the block size, and the graphs are given up last (they make each product about 3x cheaper).

    Args:
        objective: The loss, model and data.
        k: Eigenpairs ``eigs`` will compute.
        ncv: Lanczos basis size of ``eigs`` (default ``max(2k + 1, 20)``).
        steps: Lanczos steps per probe of ``density``.
        probes: Probes of ``density``.
        group: Probes processed together by ``density`` (default: ``density``'s own default,
            lowered to fit ``max_memory``).
        block_size: Most columns per product (lowered to fit ``max_memory``).
        max_memory: Bytes the run may use, or None.
        curvature: ``"hessian"``, ``"ggn"``, ``"fisher"``, ``"kfac"`` or ``"ekfac"``.
        world_size: Plan an unsharded ``objective`` as one of ``world_size`` FSDP2 processes
            (``fully_shard``: each parameter's dim 0 split in ``world_size`` chunks; ``dim`` is
            the largest process's, rank 0's) whose data are ``objective``'s batches. With a model
            on the meta device nothing is allocated: a 70B plan on a laptop.
        basis_dtype: The dtype of the ``eigs`` basis (``eigs(..., basis_dtype=)``); ``density``
            keeps float64. None: the one ``eigs`` chooses at its default tolerance
            (:func:`~hesse.operators._memory.auto_basis_dtype`: float32 for a float32
            objective), and with ``max_memory``, float32 where a float64 basis does not fit
            (before any other setting is lowered); the plan's ``basis_dtype`` says which.
        compress: ``"gptq"`` or ``"sparsegpt"``: plan that calibration instead (the other
            settings then do not apply), :func:`hesse.problem.calibration.plan_calibration`,
            a :class:`~hesse.problem.calibration.CalibrationMemory`.
        sequential: With ``compress``, as for the compressor.

    Returns:
        MemoryPlan.

    Raises:
        MemoryPlanError: nothing fits ``max_memory`` (the message holds the smallest plan and,
            for a Kronecker curvature, the largest factor).
        ValueError: a setting out of range; for a Kronecker curvature, a module the factors
            cannot cover (as ``KFACOperator`` says).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hesse import Objective
        >>> from hesse import plan
        >>> x, y = torch.randn(8, 3), torch.zeros(8, dtype=torch.long)
        >>> obj = Objective(nn.Linear(3, 2).eval(), [(x, y)], loss=nn.functional.cross_entropy)
        >>> p = plan(obj, k=2, steps=5, probes=4)
        >>> p.dim, p.ncv, p.basis_bytes, p.probes_bytes, p.basis_dtype  # small: float64 basis
        (8, 8, 896, 1536, torch.float64)
        >>> p.group, p.keep_graphs
        (4, True)
    """
    if compress is not None:  # a GPTQ / SparseGPT calibration, not eigs and density
        return plan_calibration(objective, compress, sequential=sequential)
    if curvature not in _OPERATORS:
        raise ValueError(f"plan: curvature must be one of {sorted(_OPERATORS)}, got {curvature!r}.")
    for name, value in {"k": k, "steps": steps, "probes": probes, "block_size": block_size}.items():
        if value < 1:
            raise ValueError(f"plan: {name} must be >= 1, got {value}.")
    if group is not None and not 1 <= group <= probes:
        raise ValueError(f"plan: group must be between 1 and probes={probes}, got {group}.")
    factor_bytes, largest = _factors(objective, curvature)  # refuses an uncovered module early
    # the algorithms' sizes follow the global dimension (the same on every process under FSDP)
    d, full = objective.dim, objective.dim if objective.shard is None else objective.shard.dim
    if world_size is not None:
        if world_size < 1 or objective.shard is not None:
            raise ValueError(
                f"plan: world_size={world_size} plans an unsharded objective over world_size "
                ">= 1 processes; a sharded one is planned as it is (leave world_size out)."
            )
        d = sum(
            -(-p.shape[0] // world_size) * math.prod(p.shape[1:]) if p.dim() else 1
            for p in objective.params.values()
        )
    steps = min(steps, full)
    samples, batches, first = _count(objective.batches())
    operator = _OPERATORS[curvature](objective, max_cache_bytes=0)
    # under FSDP the graph saves gathered copies of the weights, not the resident parameters
    resident = storages(objective.frozen.values()) if world_size is not None else None
    graph = operator._measure_state(first, resident)
    unit = (
        max(planned_units(objective.model))
        if world_size is not None
        else (0 if objective._gatherer is None else objective._gatherer.largest)
    )
    free = available_bytes(objective.device)
    fixed = {
        "dim": d,
        "samples": samples,
        "batches": batches,
        "curvature": curvature,
        "k": k,
        "ncv": min(ncv or max(2 * k + 1, 20), full),
        "steps": steps,
        "probes": probes,
        "graph_bytes": graph,
        "factor_bytes": factor_bytes,
        "largest_factor": largest,
        "available_bytes": free,
        "max_memory": max_memory,
        "full_dim": full,
        "sharded": objective.shard is not None or world_size is not None,
        "unit": unit,
        "basis_dtype": basis_dtype or _default_basis(objective.dtype, k, ncv, full),
    }
    itemsize = torch.empty((), dtype=objective.dtype).element_size()
    sized = functools.partial(_sized, fixed, itemsize)
    first_group = probe_group(full, steps, probes, group)
    if max_memory is None:
        keep = graph * batches <= AUTO_CACHE_FRACTION * free
        return sized(first_group, block_size, keep, free)
    if basis_dtype is None and not sized(first_group, block_size, True, max_memory).fits:
        fixed["basis_dtype"] = torch.float32  # first: it costs only round-off, in the bounds
    return _fitted(sized, first_group, block_size, max_memory, halve_group=group is None)


def _default_basis(dtype: torch.dtype, k: int, ncv: int | None, d: int) -> torch.dtype:
    """The basis dtype ``eigs`` chooses at its default tolerance and ``ncv``."""
    width = min(ncv or max(2 * k + 1, 20), d) + (1 if k == 1 else 2)
    return auto_basis_dtype(dtype, width, max(1e-10, 8 * torch.finfo(dtype).eps), dim=d)


def _fitted(
    sized: Callable, group: int, block: int, max_memory: int, *, halve_group: bool
) -> MemoryPlan:
    """The largest settings that fit: the group halved first, then the block, graphs last."""
    for keep in (True, False):
        g, b = group, block
        p = sized(g, b, keep, max_memory)
        while not p.fits and ((g > 1 and halve_group) or b > 1):
            if g > 1 and halve_group and (p.probes_bytes >= p.block_bytes or b == 1):
                g = math.ceil(g / 2)
            else:
                b = math.ceil(b / 2)
            p = sized(g, b, keep, max_memory)
        if p.fits:
            return p
    raise MemoryPlanError(_refusal(p, max_memory), p)


def _refusal(p: MemoryPlan, max_memory: int) -> str:
    """Why the smallest plan ``p`` does not fit, and what to change."""
    head = (
        f"plan: the run needs ~{_size(p.total_bytes)} even with the smallest settings, more "
        f"than max_memory={_size(max_memory)}: {p}."
    )
    if p.factor_bytes <= max_memory:
        fix = "Analyse fewer parameters (params=), lower k, ncv or steps, or raise max_memory."
    else:
        fix = (
            f"The {p.curvature.upper()} factors alone take {_size(p.factor_bytes)}, the largest "
            f"being {p.largest_factor}: leave that layer out (params=), use the exact products "
            '(curvature="ggn": no factors), or raise max_memory.'
        )
    return f"{head} {fix}"


def _sized(
    fixed: dict[str, Any], itemsize: int, group: int, block: int, keep: bool, budget: int
) -> MemoryPlan:
    """The plan of the ``fixed`` items for a group, block size and graph keeping."""
    fixed = dict(fixed)
    d, graph, _ = fixed["dim"], fixed["graph_bytes"], fixed.pop("full_dim")
    sharded, unit = fixed.pop("sharded"), fixed.pop("unit")
    basis_item = torch.empty((), dtype=fixed["basis_dtype"]).element_size()
    graphs = graph * fixed["batches"] if keep else graph
    sizes = {
        "basis_bytes": _eigs_vectors(fixed["ncv"], fixed["k"]) * d * basis_item,
        "probes_bytes": (fixed["steps"] + 1) * group * d * 8,
        "graphs_bytes": graphs,
        "block_bytes": BLOCK_FACTOR * block * d * itemsize,
        "factor_bytes": fixed["factor_bytes"],
        "gathered_bytes": unit * itemsize if sharded else 0,
    }
    total = sum(sizes.values())
    return MemoryPlan(
        **(fixed | sizes),
        group=group,
        block_size=block,
        keep_graphs=keep,
        max_cache_bytes=graphs if keep else 0,
        total_bytes=total,
        fits=total <= budget,
    )


def _count(batches: Iterable) -> tuple[int, int, Any]:
    """Samples (dim 0 of each batch's first tensor), batches, and the first batch."""
    samples, count, first = 0, 0, None
    for batch in batches:
        first = batch if first is None else first
        samples += sample_count(batch) or 0
        count += 1
    return samples, count, first


def _eigs_vectors(ncv: int, k: int) -> int:
    """Float64 ``d``-vectors alive at the peak of ``eigs`` (see its docstring, "Memory")."""
    return ncv + 3 if k == 1 else ncv + max(k + 3, 6)


def _factors(objective: Objective, curvature: str) -> tuple[int, str]:
    """Bytes of a Kronecker curvature's factors and its largest factor (``0, ""`` otherwise)."""
    if curvature not in ("kfac", "ekfac"):
        return 0, ""
    objective = full_shapes(objective)  # under FSDP the factors follow the full layers
    factors = list(_each_factor(objective))
    if not factors:
        return 0, ""
    total = KFACOperator.factor_bytes(objective)
    if curvature == "ekfac":
        # EKFAC is built from KFAC's factors, held while their eigenbases are formed in float64
        side = max(f[2] for f in factors)
        total += EKFACOperator.factor_bytes(objective) + EIGH_ENTRIES * 8 * side * side
    entries, largest, _ = max(factors)
    item = torch.empty((), dtype=objective.dtype).element_size()
    return total, f"{largest} ({_size(entries * item)})"


def _each_factor(objective: Objective) -> Iterator[tuple[int, str, int]]:
    """``(entries, description, side)`` of each factor; ``side`` 0 for those never decomposed."""
    for group in find_groups(objective, MAX_DENSE, "plan"):
        if group.dense:
            n = sum(objective.params[name].numel() for name in group.names)
            yield n * n, f"layer {group.label}: exact block {n:,} x {n:,}", 0
            continue
        rows = matrix_shape(group, objective)[0]
        for use in group.uses:
            L, R = factor_shapes(use, objective, rows)
            for shape, what in ((L, "output"), (R, "input")):
                size = " x ".join(f"{s:,}" for s in shape)
                kind = "diagonal" if len(shape) == 1 else "factor"
                side = shape[0] if len(shape) == 2 else 0
                yield (
                    math.prod(shape),
                    f"layer {use.module or '(root)'}: {what} {kind} {size}",
                    side,
                )
