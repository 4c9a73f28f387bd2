"""Parameters sharded across processes (FSDP2 ``fully_shard``): local shards and collectives.

Under ``torch.distributed.fsdp.fully_shard`` every parameter is a ``DTensor`` whose rows
(dim 0) are split over the processes. FSDP's all-gathers are detached from autograd and its
hooks swap parameters in and out of the modules, so a second derivative through them is
impossible. hesse therefore runs a copy of the module tree without FSDP's hooks and gathers
each FSDP unit's parameters itself when the unit runs, by a differentiable all-gather whose
backward is a reduce-scatter (``hesse.problem._gather``): the objective is a function of each
process's *local shards*, and its gradients and curvature products are local shards too,
already summed over the processes. :class:`Shard` maps local vectors to the full layout
(``gather``, ``local``) and sums inner products over the processes (``sum``).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from ._gather import Gatherer, Layout, layouts_of, local_shard
from ._positions import checked_mean, summed
from .params import ParamSpace

if TYPE_CHECKING:
    from .objective import Objective

_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` (a parameter) is a ``DTensor``, as ``fully_shard`` makes them."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_sharded(model: nn.Module) -> bool:
    """Whether some parameter or buffer of ``model`` is a ``DTensor`` (FSDP2, tensor parallel)."""
    state = [*model.parameters(), *model.buffers()]
    return dist.is_available() and any(is_dtensor(t) for t in state)


def _fsdp_classes() -> tuple[type, ...]:
    """The classes ``fully_shard`` mixes into a module's (imported only when needed)."""
    from torch.distributed.fsdp import FSDPModule

    return (FSDPModule,)


def plain_module(module: nn.Module) -> nn.Module:
    """A shallow copy of the module tree without FSDP: original classes, no hooks.

    Parameters and buffers are the same objects (``functional_call`` swaps them for the full
    tensors); only the module objects are new, so the model itself is never modified.
    """
    fsdp = _fsdp_classes()
    cls: Any = type(module)
    if issubclass(cls, fsdp):  # fully_shard made class FSDP<Name>(FSDPModule, <Name>)
        cls = next(b for b in cls.__bases__ if not issubclass(b, fsdp))
    copy = cls.__new__(cls)
    state = dict(module.__dict__)
    state["_parameters"] = dict(module._parameters)
    state["_buffers"] = dict(module._buffers)
    state["_modules"] = {
        n: None if m is None else plain_module(m) for n, m in module._modules.items()
    }
    for hooks in _HOOKS:
        if hooks in state:
            state[hooks] = OrderedDict()
    copy.__dict__.update(state)
    return copy


def full_tensor(t: Any) -> torch.Tensor:
    """The whole tensor of a ``DTensor`` (an all-gather), or ``t`` itself."""
    return t.full_tensor() if is_dtensor(t) else t


class Shard:
    """This process's share of the flat parameter vector, and the collectives that move it.

    Args:
        full: The space of the full parameters.
        layouts: ``{name: Layout}``: which flat entries of each parameter every process holds
            (contiguous ranges in rank order, disjoint, covering each parameter).

    Attributes:
        full: The full space; ``dim`` its dimension :math:`D`.
        space: The local space (what operators and vectors see).
        positions: ``{name: (n_local,)}`` positions of this process's entries in each
            flattened full parameter; ``shapes`` ``{name: local shape}``.
    """

    def __init__(
        self, full: ParamSpace, layouts: Mapping[str, Layout], device: torch.device | None = None
    ):
        self.full, self.layouts = full, dict(layouts)
        self.device = torch.device("cpu") if device is None else device
        self.shapes = {n: lay.local_shape for n, lay in self.layouts.items()}
        local = [self.shapes[n] for n in full.names]
        self.space = ParamSpace(full.names, local, full.aliases, shard=self)
        self.dim = full.dim

    @property
    def positions(self) -> dict[str, torch.Tensor]:
        """``{name: (n_local,)}`` positions of the local entries in each flattened parameter."""
        return {
            n: torch.arange(lay.start, lay.start + lay.count) for n, lay in self.layouts.items()
        }

    @property
    def index(self) -> torch.Tensor:
        """``(d,)`` positions of the local entries in the full flat layout (int64)."""
        slices, lay = self.full.slices(), self.layouts
        parts = [
            torch.arange(lay[n].start, lay[n].start + lay[n].count) + slices[n].start
            for n in self.full.names
        ]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    @classmethod
    def of(cls, named: Mapping[str, torch.Tensor], full: ParamSpace) -> Shard:
        """The shard of ``{name: parameter}`` (DTensors or replicated tensors): a collective."""
        device = next(iter(named.values())).device
        return cls(full, layouts_of(named), device)

    def subset(self, names: Sequence[str]) -> Shard:
        """The shard of the full subspace of ``names``."""
        return Shard(self.full.subspace(names), self.layouts, self.device)

    def gather(self, V: torch.Tensor) -> torch.Tensor:
        """Local ``(d, k)`` to full ``(D, k)``: every process gets all shards (all-gather).

        For results wanted whole (eigenvectors to save); the data passes never do this.
        """
        out = V.new_zeros((self.dim, *V.shape[1:]))
        out[self.index.to(V.device)] = V
        dist.all_reduce(out)  # the supports are disjoint: the sum adds zeros, exactly
        return out

    def local(self, W: torch.Tensor) -> torch.Tensor:
        """Full ``(D, ...)`` to this process's ``(d, ...)`` rows (of a reduced sum: a scatter)."""
        return W[self.index.to(W.device)]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the processes, in float64 (inner products of local shards)."""
        out = t.double()
        out = out.clone() if out is t else out
        dist.all_reduce(out)
        return out

    def max(self, value: float) -> float:
        """The largest of each process's ``value``."""
        out = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return float(out)

    def all(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every process (so that all take the same path)."""
        return self.max(0.0 if flag else 1.0) == 0.0


def refuse_sharded(objective: Objective, who: str, why: str) -> None:
    """Refuse an objective over sharded parameters (FSDP) where ``who`` cannot use one.

    Raises:
        ValueError: naming ``who``, ``why``, and the exact operators that do work sharded.
    """
    if objective.shard is not None:
        raise ValueError(
            f"{who}: the model's parameters are sharded across processes (FSDP fully_shard): "
            f"{why}. Use HessianOperator, GGNOperator or FisherOperator, which work on the "
            "local shards, or build the Objective on the unsharded model."
        )


def shard_model(model: nn.Module) -> nn.Module:
    """Shard ``model`` over the processes of ``torch.distributed`` with FSDP2, in place.

    Starts the default process group from the ``torchrun`` environment when none is running
    (gloo on CPU, nccl on CUDA), then calls ``fully_shard`` on every module of each
    ``nn.ModuleList`` (the transformer layers) and at the root, as FSDP2 recommends.

    Raises:
        ValueError: not launched by ``torchrun`` (no ``RANK``/``WORLD_SIZE`` environment).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ValueError(
                "--shard: no process group; launch with torchrun, e.g. `torchrun "
                "--nproc-per-node 4 -m hesse.cli eigs --hf DIR --data FILE --shard`."
            )
        cuda = next(model.parameters()).is_cuda
        dist.init_process_group("nccl" if cuda else "gloo")
    kind = "cuda" if next(model.parameters()).is_cuda else "cpu"
    mesh = init_device_mesh(kind, (dist.get_world_size(),))
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for layer in module:
                fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def my_batches(data: Any) -> list:
    """This process's share of a list of batches: every ``world``-th, from its rank on."""
    if not isinstance(data, (list, tuple)):
        raise ValueError(
            f"--shard: the data must be a list of batches to split over the processes, got "
            f"{type(data).__name__}; pass each process its own DataLoader (DistributedSampler)."
        )
    mine = list(data)[dist.get_rank() :: dist.get_world_size()]
    if not mine:
        raise ValueError(
            f"--shard: {len(data)} batches for {dist.get_world_size()} processes; every process "
            "needs at least one (lower --batch-size or use fewer processes)."
        )
    return mine


def sharded_parts(
    model: nn.Module, copy: nn.Module, chosen: Sequence[str], cast: Any, clone: bool
) -> tuple[Shard, Gatherer, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The shard, the gatherer, the local analysed shards and the other tensors of a model.

    Every ``DTensor`` parameter (analysed or not) and every analysed plain parameter (held by
    rank 0) is gathered by its unit when it runs; buffers and the other plain parameters are
    passed whole, as on one process.

    Args:
        model: The FSDP2-wrapped model.
        copy: Its hook-free copy (:func:`plain_module`), which the gatherer hooks.
        chosen: The analysed parameters' names.
        cast: Moves a tensor to the objective's device and dtype.
        clone: Copy the buffers (training-mode batch-norm updates them in place).
    """
    named = dict(model.named_parameters())
    gathered = {n: t for n, t in named.items() if n in chosen or is_dtensor(t)}
    layouts = layouts_of(gathered)
    params = {n: cast(local_shard(named[n].detach())) for n in chosen}
    state = named | dict(model.named_buffers())
    frozen = {
        n: cast(local_shard(t.detach()) if n in layouts else (t.detach().clone() if clone else t))
        for n, t in state.items()
        if n not in params
    }
    full = ParamSpace.from_named({n: named[n] for n in chosen}, _aliases(model))
    device = next(iter(params.values())).device
    shard = Shard(full, {n: layouts[n] for n in chosen}, device)
    return shard, Gatherer(copy, model, layouts), params, frozen


def _aliases(model: nn.Module) -> dict[str, str]:
    from ._selection import aliases

    return aliases(model)


def most_batches(data: Any, device: torch.device) -> int:
    """The largest number of batches any process holds (every process runs that many passes)."""
    try:
        count = len(data)
    except TypeError:
        count = sum(1 for _ in data)
    out = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return int(out)


def sharded_mean(terms: Iterable[tuple[torch.Tensor, float]], device: torch.device) -> torch.Tensor:
    """``sum_b term_b / sum_b w_b`` of local shards of derivatives, under FSDP.

    The terms are already summed over the processes (by the reduce-scatters of the data
    pass): only the weights and a failure flag are all-reduced.

    Args:
        terms: This process's ``(term, weight)`` pairs, padding passes included (weight 0).
        device: Where the collective runs.

    Raises:
        ValueError: as :func:`~hesse.problem._positions.weighted_mean`.
    """
    total, weight, bad = summed(terms)
    flags = torch.tensor([weight, float(bad is not None)], dtype=torch.float64, device=device)
    dist.all_reduce(flags)
    return checked_mean(total, float(flags[0]), bool(flags[1]), bad)


def padded(obj: Objective, fn: Any, items: Iterable | None) -> Iterator[tuple[torch.Tensor, float]]:
    """``fn`` on this process's batches (or ``items``), then on zero-weight padding passes.

    Every process runs as many passes as the one with the most batches: the others run
    ``fn(0, first batch)`` with ``obj._padding`` set (``batch_weight`` 0, the loss times 0),
    whose graph, and so whose collectives, are those of a real batch.
    """
    count = 0
    for count, item in enumerate(obj.batches() if items is None else items, 1):
        yield fn(count - 1, item)
    if items is not None or obj._most is None:
        return  # kept states hold the padding passes of the pass that built them
    for _ in range(count, obj._most):
        obj._padding = True
        try:
            term, _ = fn(0, obj._move(next(iter(obj._data))))
        finally:
            obj._padding = False
        yield term, 0.0


def zero_weight_loss(obj: Objective, params: Mapping[str, torch.Tensor], batch: Any):
    """Under FSDP, the loss of a batch of weight 0 (every label ignored): zero, from its graph.

    Its collectives must pair with the other processes' real batches, so its graph must be
    that of a real batch: the loss of the batch with its ignored labels set to class 0, times
    0. A ``loss_fn=`` batch of weight 0 is its loss times 0.

    Raises:
        ValueError: while differentiating, a batch whose relabelled weight is still 0 (class
            weight 0 for class 0, an ignore_index >= 0); the other processes then wait in
            their collectives until the process group times out.
    """
    if obj._caller is not None:
        mean, _ = obj._call(obj._caller, "model.", dict(params), (batch,), {})
        return mean * 0.0
    relabelled = _labels_kept(batch)
    if relabelled is not None and obj.batch_weight(relabelled) > 0:
        return obj.batch_loss(dict(params), relabelled)[0] * 0.0
    if torch.is_grad_enabled():
        raise ValueError(
            "Objective: a batch of this process has weight 0 and could not be given a real "
            "batch's graph; under FSDP every process's pass must differentiate the same graph. "
            "Drop the batches whose labels are all ignored (-100) from the data."
        )
    from ._calls import model_inputs
    from ._losses import logits_of

    return logits_of(obj._forward(dict(params), model_inputs(batch))).sum() * 0.0


def _labels_kept(batch: Any) -> Any:
    """The batch with its ignored (-100) integer labels set to 0, or None (no such labels)."""
    if isinstance(batch, Mapping) and isinstance(batch.get("labels"), torch.Tensor):
        y = batch["labels"]
        return None if y.is_floating_point() else {**batch, "labels": y.clamp_min(0)}
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor):
        y = batch[1]
        pair = (batch[0], y.clamp_min(0))
        return None if y.is_floating_point() else (pair if isinstance(batch, tuple) else list(pair))
    return None


def infer_in_step(shard: Shard | None, infer: Any, module: nn.Module, first: Any, obj: Objective):
    """``infer(module, labels, batches, forward)``, every process running as many forwards.

    Which batch confirms a model's own loss may differ between processes; the ones that ran
    fewer forwards (each unit's gathers are collectives) run the first batch again.
    """
    if shard is None:
        return infer(module, first["labels"], obj.batches(), obj._logits_and_loss)
    calls = []

    def forward(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(batch)
        return obj._logits_and_loss(batch)

    found = infer(module, first["labels"], obj.batches(), forward)
    for _ in range(int(shard.max(len(calls))) - len(calls)):
        obj._logits_and_loss(obj._move(first))
    return found
