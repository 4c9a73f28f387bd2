"""Parameters sharded across processes (FSDP2 ``fully_shard``): local shards, full copies.

Under ``torch.distributed.fsdp.fully_shard`` every parameter is a ``DTensor`` whose rows
(dim 0) are split over the processes. FSDP's all-gathers are detached from autograd and its
hooks swap parameters in and out of the modules, so a second derivative through them is
impossible. hesse therefore runs the model as a function of *full* parameters
(gathered once, when the :class:`~hesse.Objective` is built) on a copy of the module tree
without FSDP's hooks, differentiates each process's data locally and exactly, and meets the
other processes only at the boundaries of a product: the input vectors (each process's local
shard) are all-gathered, and the summed product is reduced and cut back to the local shard
(a reduce-scatter). Vectors, bases and results are local shards throughout; only the data pass
sees full parameters (one model's worth per process, transiently: the memory of one
unsharded forward and backward).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

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


def _local_positions(t: Any) -> torch.Tensor:
    """``(n_local,)`` positions in the flattened full tensor of this process's local elements.

    A ``DTensor``'s are found by distributing the positions themselves with its mesh and
    placements (so uneven row splits follow torch's own rule); a plain tensor, the same on
    every process, belongs to rank 0.
    """
    if not is_dtensor(t):
        n = t.numel()
        return torch.arange(n) if dist.get_rank() == 0 else torch.zeros(0, dtype=torch.long)
    from torch.distributed.tensor import distribute_tensor

    where = torch.arange(t.numel(), device=t.device_mesh.device_type).reshape(t.shape)
    return distribute_tensor(where, t.device_mesh, t.placements).to_local().reshape(-1).cpu()


class Shard:
    """This process's share of the flat parameter vector, and the collectives that move it.

    Args:
        full: The space of the full parameters (the layout of the data pass).
        positions: ``{name: (n_local,)}`` positions in each flattened full parameter of the
            elements this process holds (disjoint across processes, covering each parameter).
        shapes: ``{name: shape}`` of each local shard.

    Attributes:
        full: The full space; ``dim`` its dimension :math:`D`.
        space: The local space (what operators and vectors see); ``index`` ``(d,)`` the
            positions of its entries in the full flat layout.
    """

    def __init__(
        self,
        full: ParamSpace,
        positions: Mapping[str, torch.Tensor],
        shapes: Mapping[str, Sequence[int]],
    ):
        self.full, self.positions, self.shapes = full, dict(positions), dict(shapes)
        local = [shapes[n] for n in full.names]
        self.space = ParamSpace(full.names, local, full.aliases, shard=self)
        slices = full.slices()
        parts = [positions[n] + slices[n].start for n in full.names]
        self.index = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        self.dim = full.dim

    @classmethod
    def of(cls, named: Mapping[str, torch.Tensor], full: ParamSpace) -> Shard:
        """The shard of ``{name: parameter}`` (DTensors or replicated tensors)."""
        positions = {n: _local_positions(t) for n, t in named.items()}
        shapes = {n: _local_shape(t, positions[n]) for n, t in named.items()}
        return cls(full, positions, shapes)

    def subset(self, names: Sequence[str]) -> Shard:
        """The shard of the full subspace of ``names``."""
        return Shard(self.full.subspace(names), self.positions, self.shapes)

    def gather(self, V: torch.Tensor) -> torch.Tensor:
        """Local ``(d, k)`` to full ``(D, k)``: every process gets all shards (all-gather)."""
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


def _local_shape(t: Any, positions: torch.Tensor) -> torch.Size:
    """Shape of this process's shard of ``t`` (a replicated tensor: all on rank 0, else empty)."""
    if is_dtensor(t):
        return t.to_local().shape
    return t.shape if positions.numel() == t.numel() else torch.Size([0, *t.shape[1:]])


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
