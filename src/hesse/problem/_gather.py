r"""Differentiable per-unit gathering of FSDP2-sharded parameters (exact second derivatives).

FSDP2's own all-gathers run outside autograd, so nothing can be differentiated through them.
Here every sharded parameter enters the model through :class:`GatherParams`, an all-gather
(of one FSDP unit's parameters at once) whose backward is the reduce-scatter
:class:`ReduceScatterParams`, whose backward is again the all-gather. Both are linear and
each is the other's adjoint, so first *and* second derivatives with respect to the local
shards are exact:

.. math::
    g_r = \Big(\sum_p \nabla_{\theta} L_p(\theta)\Big)_{[r]}, \qquad
    (Hv)_r = \Big(\sum_p \nabla^2 L_p(\theta)\, \mathrm{gather}(v)\Big)_{[r]}

for process ``r``'s rows ``[r]``, ``L_p`` the loss of process ``p``'s batches and ``v`` the
vector whose local rows each process holds. No full-size gradient or product vector is ever
formed: each gather and reduce-scatter is one FSDP unit's parameters at a time.

The gathers happen where FSDP2 gathers: when a unit (a module passed to ``fully_shard``, and
the root for every parameter outside the nested units) starts its forward, its parameters are
gathered and set on their modules; when it ends they are released. A graph kept for a second
backward still holds each unit's gathered weights that its operations saved (about one full
copy of the matrix weights per process while the graph lives). Collectives inside autograd
must run in the same order on every process: the objective pads the processes with fewer
batches with zero-weight passes (``Objective.accumulate``) so that every process runs the same
forwards and backwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn


class Layout:
    """How one parameter's flat entries are split over the processes: a range per rank.

    Args:
        shape: The full parameter's shape.
        counts: ``(world,)`` numbers of flat entries of each rank, in rank order (their ranges
            follow each other in the flattened full tensor).
        local_shape: This process's shard shape.
    """

    def __init__(self, shape: torch.Size, counts: list[int], local_shape: torch.Size):
        self.shape, self.counts, self.local_shape = shape, counts, local_shape
        self.rank = dist.get_rank()
        self.start = sum(counts[: self.rank])
        self.count = counts[self.rank]

    @property
    def numel(self) -> int:
        """Entries of the full parameter."""
        return sum(self.counts)


def _gather_all(layouts: tuple[Layout, ...], locals_: tuple[torch.Tensor, ...]) -> list:
    """The full tensors of several parameters from every process's shards: one all-gather."""
    counts = [[lay.counts[r] for lay in layouts] for r in range(len(layouts[0].counts))]
    most = max(sum(c) for c in counts)
    buf = locals_[0].new_zeros(most)
    if any(t.numel() for t in locals_):
        mine = torch.cat([t.reshape(-1) for t in locals_])
        buf[: mine.numel()] = mine
    parts = [torch.empty_like(buf) for _ in counts]
    dist.all_gather(parts, buf)
    pieces = [torch.split(p[: sum(c)], c) for p, c in zip(parts, counts, strict=True)]
    return [
        torch.cat([pieces[r][j] for r in range(len(counts))]).view(lay.shape)
        for j, lay in enumerate(layouts)
    ]


def _reduce_scatter_all(layouts: tuple[Layout, ...], fulls: tuple[torch.Tensor, ...]) -> list:
    """Each process's rows of the sums over the processes of several tensors: one all-reduce."""
    total = torch.cat([t.detach().reshape(-1) for t in fulls])
    dist.all_reduce(total)  # gloo has no reduce_scatter
    out, start = [], 0
    for lay in layouts:
        out.append(total[start + lay.start : start + lay.start + lay.count].clone())
        start += lay.numel
    return [t.view(lay.local_shape) for t, lay in zip(out, layouts, strict=True)]


class GatherParams(torch.autograd.Function):
    """``locals -> fulls``: one all-gather; its backward is :class:`ReduceScatterParams`."""

    @staticmethod
    def forward(ctx: Any, layouts: tuple[Layout, ...], *locals_: torch.Tensor) -> tuple:
        ctx.layouts = layouts
        return tuple(_gather_all(layouts, locals_))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        return (None, *ReduceScatterParams.apply(ctx.layouts, *grads))


class ReduceScatterParams(torch.autograd.Function):
    """``fulls -> locals``: the sums over processes, this rank's rows; backward: the gather."""

    @staticmethod
    def forward(ctx: Any, layouts: tuple[Layout, ...], *fulls: torch.Tensor) -> tuple:
        ctx.layouts = layouts
        return tuple(_reduce_scatter_all(layouts, fulls))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        return (None, *GatherParams.apply(ctx.layouts, *grads))


def gather(locals_: list[torch.Tensor], layouts: list[Layout]) -> tuple[torch.Tensor, ...]:
    """The full parameters from the local shards, differentiable twice (see the module)."""
    return GatherParams.apply(tuple(layouts), *locals_)


Unit = list[tuple[nn.Module, str, str]]  # (module of the hook-free copy, attribute, name)


class Gatherer:
    """Gathers each unit's parameters into the hook-free module copy while the unit runs.

    Args:
        copy: The hook-free copy of the model (``plain_module``); hooks are added to it.
        model: The FSDP2-wrapped model (to find its units).
        layouts: ``{name: Layout}`` of every parameter to gather (canonical names).

    Attributes:
        units: ``{unit path: [(module, attribute, name)]}``, ``""`` the root.
        largest: Entries of the largest unit's parameters (what one gather holds at once).
        calls: Gathers run so far (a test counts them).
    """

    def __init__(self, copy: nn.Module, model: nn.Module, layouts: Mapping[str, Layout]):
        self.layouts, self.calls = dict(layouts), 0
        self.shared: dict[int, tuple[list[torch.Tensor], tuple]] | None = None
        self.current: Mapping[str, torch.Tensor] | None = None
        self.units = _units(copy, model, set(layouts))
        self.largest = max(
            (sum(layouts[n].numel for n in {n for _, _, n in u}) for u in self.units.values()),
            default=0,
        )
        modules = dict(copy.named_modules(remove_duplicate=False))
        for path, unit in self.units.items():
            if unit:
                modules[path].register_forward_pre_hook(self._pre(unit))
                modules[path].register_forward_hook(self._post(unit), always_call=True)

    @contextmanager
    def using(self, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Gather from ``tensors`` (``{name: local shard}``) during the forwards inside."""
        self.current = tensors
        try:
            yield
        finally:
            self.current = None

    @contextmanager
    def sharing(self) -> Iterator[None]:
        """Within: a unit run again on the very same local tensors reuses its gathered ones.

        The batches of one pass that differentiate the same leaves (the Hessian's first pass)
        then share one gathered copy, which their kept graphs hold once instead of once per
        batch. Every process shares alike (the same code on the same kind of tensors), so the
        gathers still pair up. Released when the block ends (the graphs keep what they saved).
        """
        self.shared = {}
        try:
            yield
        finally:
            self.shared = None

    def _pre(self, unit: Unit):
        def hook(module: nn.Module, args: Any) -> None:
            if self.current is None:
                raise RuntimeError("hesse: a sharded module ran outside Objective's data pass.")
            names = list(dict.fromkeys(n for _, _, n in unit))  # shared ones once
            mine = [self.current[n] for n in names]
            seen = None if self.shared is None else self.shared.get(id(module))
            if seen is not None and all(a is b for a, b in zip(seen[0], mine, strict=True)):
                fulls = seen[1]
            else:
                fulls = gather(mine, [self.layouts[n] for n in names])
                self.calls += 1
                if self.shared is not None and torch.is_grad_enabled():
                    self.shared[id(module)] = (mine, fulls)
            full = dict(zip(names, fulls, strict=True))
            for sub, attr, name in unit:
                sub._parameters[attr] = cast(Any, full[name])  # a plain tensor, as functional_call

        return hook

    def _post(self, unit: Unit):
        originals = [(sub, attr, sub._parameters[attr]) for sub, attr, _ in unit]

        def hook(module: nn.Module, args: Any, out: Any) -> None:
            for sub, attr, original in originals:
                sub._parameters[attr] = original  # release the gathered tensor

        return hook


def _units(copy: nn.Module, model: nn.Module, names: set[str]) -> dict[str, Unit]:
    """Each FSDP unit's parameters (its subtree less nested units'), the root taking the rest."""
    from torch.distributed.fsdp import FSDPModule

    ids: dict[int, str] = {}
    for name, p in model.named_parameters():  # canonical (first) names of shared parameters
        ids.setdefault(id(p), name)
    roots = [""] + [path for path, m in model.named_modules() if path and isinstance(m, FSDPModule)]
    copies = dict(copy.named_modules(remove_duplicate=False))
    owner: dict[str, Unit] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        root = max((r for r in roots if r == "" or path == r or path.startswith(r + ".")), key=len)
        for attr, p in module._parameters.items():
            found = None if p is None else ids.get(id(p))
            if found is not None and found in names:
                owner.setdefault(root, []).append((copies[path], attr, found))
    return {r: owner.get(r, []) for r in roots}


def layouts_of(named: Mapping[str, torch.Tensor]) -> dict[str, Layout]:
    """The :class:`Layout` of each parameter: a ``DTensor`` sharded on dim 0, or a plain one.

    A plain tensor (the same on every process) is held whole by rank 0. One all-gather of the
    local row counts serves all parameters.

    Raises:
        ValueError: a ``DTensor`` that is not split along dim 0 over a 1-D mesh of all the
            processes (HSDP, tensor parallel, a sub-mesh), which these layouts do not describe.
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Shard as DShard

    rows = []
    for name, t in named.items():
        if isinstance(t, DTensor):
            place = t.placements
            whole = t.device_mesh.size() == dist.get_world_size()
            if t.device_mesh.ndim != 1 or len(place) != 1 or place[0] != DShard(0) or not whole:
                raise ValueError(
                    f"Objective: parameter {name!r} is a DTensor with placements {place} on a "
                    f"{t.device_mesh.ndim}-D mesh of {t.device_mesh.size()} of "
                    f"{dist.get_world_size()} processes; hesse differentiates FSDP2 fully_shard "
                    "models sharded over all processes (Shard(0) on a 1-D mesh of the whole "
                    "world): fully_shard(module, mesh=init_device_mesh(kind, (world_size,)))."
                )
            rows.append(t.to_local().shape[0] if t.dim() else t.to_local().numel())
        else:
            rows.append((t.shape[0] if t.dim() else 1) if dist.get_rank() == 0 else 0)
    device = local_shard(next(iter(named.values()))).device
    mine = torch.tensor(rows, dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    table = torch.stack(every).tolist()
    out = {}
    for j, (name, t) in enumerate(named.items()):
        per_row = math.prod(t.shape[1:]) if t.dim() else 1
        counts = [r[j] * per_row for r in table]
        out[name] = Layout(t.shape, counts, local_shard(t).shape)
    return out


def local_shard(t: Any) -> torch.Tensor:
    """This process's shard of a parameter: a ``DTensor``'s local tensor; a plain one on rank 0."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return t.to_local()
    if dist.get_rank() == 0:
        return t
    return t.reshape(-1)[:0] if t.dim() == 0 else t[:0]


def planned_units(model: nn.Module) -> list[int]:
    """Entries of each unit that ``shard_model`` would make (for plans of unsharded models).

    Every layer of each ``nn.ModuleList`` is a unit, and the root holds the rest.
    """
    layers = [m for ml in model.modules() if isinstance(ml, nn.ModuleList) for m in ml]
    seen: set[int] = set()
    sizes = []
    for layer in layers:
        ps = [p for p in layer.parameters() if id(p) not in seen]
        seen.update(id(p) for p in ps)
        sizes.append(sum(p.numel() for p in ps))
    rest = sum(p.numel() for p in model.parameters() if id(p) not in seen)
    return [*sizes, rest]
