"""Attention heads and MLP neurons of known modules: their weights, and their real removal.

Known modules: the tiny-lm demo's ``Attention`` and ``MLP`` (parameters held directly) and
Hugging Face BERT's ``BertAttention`` and ``BertLayer`` (query/key/value and
intermediate/output ``nn.Linear`` layers). Removing a unit slices those tensors, so the
pruned model holds fewer parameters; zeroing the same slices gives the same outputs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from ..demo import tiny_lm

if TYPE_CHECKING:
    from transformers.models.bert.modeling_bert import BertAttention, BertLayer

STRUCTURES = ("heads", "channels")


@dataclass(frozen=True)
class Unit:
    """One attention head or MLP neuron and the slices of the parameters it owns.

    Attributes:
        kind: ``"heads"`` or ``"channels"`` (an MLP's intermediate neuron).
        module: Name of the module that holds it (the attention, or the MLP / BERT layer).
        index: Its position in that module now.
        slices: ``(parameter name, dim, indices)`` of each parameter slice it owns.
    """

    kind: str
    module: str
    index: int
    slices: tuple[tuple[str, int, tuple[int, ...]], ...]


def find_units(model: nn.Module, structure: str) -> list[Unit]:
    """Every head (``"heads"``) or MLP neuron (``"channels"``) of the known modules of ``model``.

    Raises:
        ValueError: an unknown structure, or a model with no known module of that kind.
    """
    if structure not in STRUCTURES:
        raise ValueError(f"prune: structure must be one of {STRUCTURES}, got {structure!r}.")
    bert = _bert_classes()
    units = []
    for name, module in model.named_modules():
        p = name + "." if name else ""
        if structure == "heads" and isinstance(module, tiny_lm.Attention):
            units += _tiny_heads(name, p, module)
        elif structure == "heads" and bert and isinstance(module, bert[0]):
            units += _bert_heads(name, p, module)
        elif structure == "channels" and isinstance(module, tiny_lm.MLP):
            slices = [(p + "in_weight", 0), (p + "in_bias", 0), (p + "out_weight", 1)]
            units += _neurons(name, slices, module.in_bias.shape[0])
        elif structure == "channels" and bert and isinstance(module, bert[1]):
            fc = p + "intermediate.dense."
            slices = [(fc + "weight", 0), (fc + "bias", 0), (p + "output.dense.weight", 1)]
            units += _neurons(name, slices, module.intermediate.dense.out_features)
    if not units:
        raise ValueError(
            f"prune: no {structure} found in {type(model).__name__}; structured pruning knows "
            "the tiny-lm demo's Attention/MLP and Hugging Face BERT layers. Prune "
            "unstructured or with structure='n:m' instead."
        )
    return units


def unit_index(space, unit: Unit) -> torch.Tensor:
    """Flat indices (in the layout of ``space``) of the weights a unit owns.

    Raises:
        ValueError: a parameter of the unit is not analysed in ``space``.
    """
    slices, shapes = space.slices(), dict(zip(space.names, space.shapes, strict=True))
    parts = []
    for name, dim, idx in unit.slices:
        if name not in slices:
            raise ValueError(
                f"prune: {unit.kind} {unit.index} of {unit.module!r} owns {name!r}, which the "
                "objective does not analyse; build it with params= that include it."
            )
        grid = torch.arange(shapes[name].numel()).reshape(shapes[name])
        parts.append(slices[name].start + grid.index_select(dim, torch.tensor(idx)).reshape(-1))
    return torch.cat(parts)


def unit_size(unit: Unit, model: nn.Module) -> int:
    """Number of parameters a unit owns."""
    params = dict(model.named_parameters())
    total = 0
    for name, dim, idx in unit.slices:
        shape = params[name].shape
        total += len(idx) * shape.numel() // shape[dim]
    return total


def shrink(model: nn.Module, units: list[Unit]) -> None:
    """Remove ``units`` from ``model`` in place, slicing the parameters that hold them."""
    by_module: dict[str, list[Unit]] = {}
    for u in units:
        by_module.setdefault(u.module, []).append(u)
    modules = dict(model.named_modules())
    for name, removed in by_module.items():
        module, gone = modules[name], {u.index for u in removed}
        for pname, dim, keep in _kept_slices(model, name, removed[0].kind, gone):
            _slice_param(model, pname, dim, keep)
        if isinstance(module, tiny_lm.Attention):
            module.heads -= len(gone)
        elif isinstance(module, tiny_lm.MLP):
            continue
        elif removed[0].kind == "heads":
            attn = module.self
            attn.num_attention_heads -= len(gone)
            attn.all_head_size = attn.num_attention_heads * attn.attention_head_size
        else:  # find_units knows no other MLP
            _linear_sizes(cast("BertLayer", module))


def _kept_slices(model: nn.Module, name: str, kind: str, gone: set[int]):
    """``(parameter, dim, kept indices)`` of a module after removing the units ``gone``."""
    units = [u for u in find_units(model, kind) if u.module == name]
    kept = [u for u in units if u.index not in gone]
    for j, (pname, dim, _) in enumerate(units[0].slices):
        idx = [i for u in kept for i in u.slices[j][2]]
        yield pname, dim, torch.tensor(idx, dtype=torch.long)


def _slice_param(model: nn.Module, pname: str, dim: int, keep: torch.Tensor) -> None:
    owner_name, _, attr = pname.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = getattr(owner, attr)
    new = nn.Parameter(old.detach().index_select(dim, keep).clone(), old.requires_grad)
    setattr(owner, attr, new)


def _linear_sizes(layer: BertLayer) -> None:
    """Keep a BERT layer's ``nn.Linear`` size attributes in step with their weights."""
    for fc in (layer.intermediate.dense, layer.output.dense):
        fc.out_features, fc.in_features = fc.weight.shape


def _tiny_heads(name: str, p: str, module: tiny_lm.Attention) -> list[Unit]:
    width = module.out_weight.shape[1]  # heads x head size: the model width until pruned
    hd = width // module.heads
    units = []
    for h in range(module.heads):
        own = tuple(range(h * hd, (h + 1) * hd))
        rows = tuple(i + k * width for k in range(3) for i in own)
        slices = (
            (p + "qkv_weight", 0, rows),
            (p + "qkv_bias", 0, rows),
            (p + "out_weight", 1, own),
        )
        units.append(Unit("heads", name, h, slices))
    return units


def _bert_heads(name: str, p: str, module: BertAttention) -> list[Unit]:
    attn, hd = module.self, module.self.attention_head_size
    units = []
    for h in range(attn.num_attention_heads):
        own = tuple(range(h * hd, (h + 1) * hd))
        slices = tuple(
            (f"{p}self.{proj}.{kind}", 0, own)
            for proj in ("query", "key", "value")
            for kind in ("weight", "bias")
        )
        units.append(Unit("heads", name, h, (*slices, (p + "output.dense.weight", 1, own))))
    return units


def _neurons(name: str, slices: list[tuple[str, int]], count: int) -> list[Unit]:
    return [
        Unit("channels", name, j, tuple((pname, dim, (j,)) for pname, dim in slices))
        for j in range(count)
    ]


def _bert_classes() -> tuple[type[BertAttention], type[BertLayer]] | None:
    """``(BertAttention, BertLayer)`` when transformers is loaded.

    A BERT model can only exist once transformers is imported; not importing it otherwise
    saves seconds for every other model.
    """
    if "transformers" not in sys.modules:
        return None
    from transformers.models.bert.modeling_bert import BertAttention, BertLayer

    return BertAttention, BertLayer
