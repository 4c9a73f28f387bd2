"""The structured groups HESSO trains and prunes, and their removal from a copy of the model.

Heads and MLP neurons of the modules :mod:`hesse.prune` knows (tiny-lm, BERT) come from
``find_units``; an ``nn.Sequential`` of ``nn.Conv2d`` / ``nn.Linear`` layers (the digits CNN)
gives one group per output channel or neuron of every layer but the last: the rows (and bias)
that produce it and the input columns of the next layer that read it. Zeroing a group gives the
same outputs as removing it, whatever the activation between the layers, because the columns
that read it are zero too.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ._units import Unit, find_units, shrink

# modules that act per channel (or per element) and may sit between two pruned layers
_PASS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.GELU, nn.Tanh, nn.SiLU, nn.Sigmoid)
_PASS += (nn.LeakyReLU, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Flatten)


def hesso_groups(model: nn.Module) -> list[Unit]:
    """Every prunable group of ``model``: heads and MLP neurons, or conv/linear channels.

    Raises:
        ValueError: a model with neither known attention/MLP modules nor a plain
            ``nn.Sequential`` chain of ``nn.Conv2d``/``nn.Linear`` layers.
    """
    units: list[Unit] = []
    for structure in ("heads", "channels"):
        try:
            units += find_units(model, structure)
        except ValueError:
            continue
    if units:
        return units
    if isinstance(model, nn.Sequential):
        return chain_units(model)
    raise ValueError(
        f"HESSO: no prunable groups found in {type(model).__name__}; it knows the tiny-lm "
        "demo's Attention/MLP, Hugging Face BERT layers, and nn.Sequential chains of "
        "nn.Conv2d/nn.Linear layers. Pass groups= (a list of hesse.prune.Unit) to name them."
    )


def chain_units(model: nn.Sequential) -> list[Unit]:
    """One group per output channel of each ``nn.Conv2d``/``nn.Linear`` but the last.

    Raises:
        ValueError: a module between two layers that does not act per channel (batch-norm
            included: its running statistics are not parameters), a grouped convolution, or
            a flatten whose width is not a multiple of the channels before it.
    """
    layers = [(n, m) for n, m in model.named_children() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for name, module in model.named_children():
        if not isinstance(module, (nn.Conv2d, nn.Linear, *_PASS)):
            raise ValueError(
                f"HESSO: {name!r} ({type(module).__name__}) sits in the chain; channel groups "
                "need layers joined by per-channel modules only (activations, pooling, "
                "dropout, flatten)."
            )
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise ValueError(f"HESSO: {name!r} is a grouped convolution; groups=1 only.")
    units = []
    for (a, A), (b, B) in zip(layers, layers[1:], strict=False):
        out = A.weight.shape[0]
        width = B.weight.shape[1]
        if width % out:
            raise ValueError(
                f"HESSO: {b!r} reads {width} inputs, not a multiple of the {out} channels of {a!r}."
            )
        s = width // out  # a flatten between them: each channel feeds s spatial positions
        for j in range(out):
            cols = tuple(range(j * s, (j + 1) * s))
            slices = [(f"{a}.weight", 0, (j,)), (f"{b}.weight", 1, cols)]
            if A.bias is not None:
                slices.insert(1, (f"{a}.bias", 0, (j,)))
            units.append(Unit("channels", a, j, tuple(slices)))
    if not units:
        raise ValueError("HESSO: the chain needs at least two nn.Conv2d/nn.Linear layers.")
    return units


def remove_groups(model: nn.Module, units: list[Unit]) -> nn.Module:
    """A copy of ``model`` without ``units`` (smaller tensors); ``model`` is left untouched."""
    pruned = copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    chain = [u for u in units if isinstance(modules[u.module], (nn.Conv2d, nn.Linear))]
    known = [u for u in units if u not in chain]
    if known:
        shrink(pruned, known)
    if chain:
        _slice_chain(pruned, chain)
    return pruned


def _slice_chain(model: nn.Module, units: list[Unit]) -> None:
    """Cut the chain ``units``' rows and columns out of ``model``'s layers, in place."""
    gone: dict[tuple[str, int], set[int]] = {}
    for u in units:
        for name, dim, idx in u.slices:
            gone.setdefault((name, dim), set()).update(idx)
    params = dict(model.named_parameters())
    for (name, dim), drop in gone.items():
        size = params[name].shape[dim]
        keep = torch.tensor([i for i in range(size) if i not in drop], dtype=torch.long)
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        old = getattr(owner, attr)
        setattr(owner, attr, nn.Parameter(old.detach().index_select(dim, keep).clone()))
        params[name] = getattr(owner, attr)
    for _, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1]
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape


@dataclass(frozen=True)
class GroupIndex:
    """Where each group's weights sit in each parameter, for segment sums and projections.

    Attributes:
        names: Parameter names, in the optimizer's order.
        positions: Per parameter, ``(n,)`` flat positions (within it) that belong to a group.
        segments: Per parameter, ``(n,)`` the group each position belongs to.
        sizes: ``(G,)`` weights per group.
        modules: ``(G,)`` module index of each group (groups of one module share it).
    """

    names: tuple[str, ...]
    positions: tuple[torch.Tensor, ...]
    segments: tuple[torch.Tensor, ...]
    sizes: torch.Tensor
    modules: torch.Tensor

    @classmethod
    def build(cls, named: Mapping[str, torch.Tensor], units: list[Unit]) -> GroupIndex:
        """Index ``units`` over the parameters ``named`` (``{name: tensor}``, in order).

        Raises:
            ValueError: a group owns a parameter that is not in ``named``.
        """
        pos: dict[str, list[torch.Tensor]] = {n: [] for n in named}
        seg: dict[str, list[torch.Tensor]] = {n: [] for n in named}
        sizes = torch.zeros(len(units), dtype=torch.long)
        for i, u in enumerate(units):
            for name, dim, idx in u.slices:
                if name not in named:
                    raise ValueError(
                        f"HESSO: group {u.module}[{u.index}] owns {name!r}, which the optimizer "
                        "does not train; give it the model's trainable parameters."
                    )
                grid = _grid(named[name].shape, dim, idx)
                pos[name].append(grid.reshape(-1))
                seg[name].append(torch.full((grid.numel(),), i, dtype=torch.long))
                sizes[i] += grid.numel()
        empty = torch.zeros(0, dtype=torch.long)
        mods = list(dict.fromkeys(u.module for u in units))
        return cls(
            names=tuple(named),
            positions=tuple(torch.cat(pos[n]) if pos[n] else empty for n in named),
            segments=tuple(torch.cat(seg[n]) if seg[n] else empty for n in named),
            sizes=sizes,
            modules=torch.tensor([mods.index(u.module) for u in units], dtype=torch.long),
        )

    def segment_sum(self, values: list[torch.Tensor]) -> torch.Tensor:
        r"""``(G,)`` float64 :math:`\sum_{q \in g} v_q` of per-parameter ``values``."""
        out = torch.zeros(len(self.sizes), dtype=torch.float64)
        for v, p, s in zip(values, self.positions, self.segments, strict=True):
            if len(p):
                out.index_add_(0, s, v.reshape(-1)[p].to(torch.float64))
        return out

    def scale(self, params: list[torch.Tensor], factors: torch.Tensor) -> list[torch.Tensor]:
        """Copies of ``params`` with each group's weights multiplied by ``factors[group]``.

        A weight owned by two groups (a conv weight is a row of one channel and a column of
        the channel before) takes both factors.
        """
        out = []
        for x, p, s in zip(params, self.positions, self.segments, strict=True):
            f = torch.ones(x.numel(), dtype=x.dtype, device=x.device)
            if len(p):
                f.scatter_reduce_(0, p, factors[s].to(x), reduce="prod")
            out.append(x * f.reshape(x.shape))
        return out


def _grid(shape: torch.Size, dim: int, idx: tuple[int, ...]) -> torch.Tensor:
    """Flat positions of the slice ``idx`` along ``dim`` of a tensor of ``shape``."""
    return torch.arange(shape.numel()).reshape(shape).index_select(dim, torch.tensor(idx))


def removed_params(units: list[Unit], pruned: torch.Tensor, named: dict) -> int:
    """Distinct weights owned by the pruned groups (a weight shared by two counts once)."""
    gone = [torch.zeros(p.numel(), dtype=torch.bool) for p in named.values()]
    where = dict(zip(named, gone, strict=True))
    for u, is_gone in zip(units, pruned.tolist(), strict=True):
        if not is_gone:
            continue
        for name, dim, idx in u.slices:
            where[name][_grid(named[name].shape, dim, idx).reshape(-1)] = True
    return int(sum(int(g.sum()) for g in gone))
