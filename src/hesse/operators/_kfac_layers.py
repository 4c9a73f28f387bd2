"""Which modules Kronecker factors cover, which parameters share a block, and what it weighs.

Every analysed parameter lands in exactly one group, the parameters of one diagonal block:

- a **factored** group: the weight (and bias) of ``nn.Linear``, Hugging Face ``Conv1D``,
  ``nn.Conv2d`` (zero padding, one group) and ``nn.Embedding``; a weight that several of these
  modules use (an embedding tied to the LM head) is one group with one Kronecker term per use;
- a **dense** group: the parameters of any other module (LayerNorm, RMSNorm, batch-norm, a
  model's own parameters), whose exact block is formed when it has at most ``max_dense``
  entries, and refused by name otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..problem._weights import is_hf_conv1d, output_axis
from ..problem.objective import Objective


@dataclass(frozen=True)
class Use:
    """One factored module's use of its group's parameters.

    Attributes:
        module: The module's name.
        layer: The module.
        kind: ``"linear"`` (``nn.Linear`` and Hugging Face ``Conv1D``), ``"conv2d"`` or
            ``"embedding"``.
        weight: The analysed weight's name (as in ``Objective.space``), or None.
        bias: The analysed bias's name, or None.
    """

    module: str
    layer: nn.Module
    kind: str
    weight: str | None
    bias: str | None


@dataclass(frozen=True)
class Group:
    """Parameters that share one diagonal block.

    Attributes:
        names: The parameters, in the order of ``Objective.space``.
        modules: Names of the modules that own or use them.
        uses: The factored uses (empty for a dense group).
        dense: Whether the block is the exact dense one.
    """

    names: tuple[str, ...]
    modules: tuple[str, ...]
    uses: tuple[Use, ...]
    dense: bool

    @property
    def label(self) -> str:
        """The modules' names, joined by ``+`` for a tied weight (``"(root)"`` for the model)."""
        return "+".join(m or "(root)" for m in self.modules)


def factored_kind(layer: nn.Module) -> str | None:
    """The factored kind of a module, or None when it gets a dense block."""
    own = {name for name, _ in layer.named_parameters(recurse=False)}
    if not own <= {"weight", "bias"}:
        return None
    if isinstance(layer, nn.Linear) or is_hf_conv1d(layer):
        return "linear"
    if isinstance(layer, nn.Conv2d):
        return "conv2d" if conv_padding(layer) is not None else None
    if isinstance(layer, nn.Embedding) and layer.max_norm is None:
        return None if layer.scale_grad_by_freq else "embedding"
    return None


def conv_padding(layer: nn.Conv2d) -> tuple[int, int] | None:
    """The zero padding of a one-group convolution, per side; None when unfold cannot apply it."""
    if layer.groups != 1 or layer.padding_mode != "zeros":
        return None
    if layer.padding == "valid":
        return (0, 0)
    if layer.padding != "same":
        return int(layer.padding[0]), int(layer.padding[1])
    total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size, strict=True)]
    return None if any(t % 2 for t in total) else (total[0] // 2, total[1] // 2)


def find_groups(objective: Objective, max_dense: int, who: str) -> list[Group]:
    """The groups of the analysed parameters, in the order of their first parameter.

    Raises:
        ValueError: a dense group with more than ``max_dense`` entries, or parameters shared
            between factored modules in a way one Kronecker block cannot hold.
    """
    space = objective.space
    parent = {n: n for n in space.names}
    uses, dense = [], {}
    for name, layer, mine in _owners(objective):
        kind = factored_kind(layer)
        if kind is None:
            dense.update(dict.fromkeys(mine.values(), name))
        else:
            uses.append(Use(name, layer, kind, mine.get("weight"), mine.get("bias")))
        _link(parent, list(mine.values()))
    members: dict[str, list[str]] = {}
    for n in space.names:
        members.setdefault(_root(parent, n), []).append(n)
    groups = [_group(names, uses, dense) for names in members.values()]
    for group in groups:
        _check(group, objective, max_dense, who)
    return groups


def _owners(objective: Objective) -> Iterator[tuple[str, nn.Module, dict[str, str]]]:
    """``(module name, module, {own name: analysed name})`` for modules with analysed parameters."""
    space, analysed = objective.space, set(objective.space.names)
    for name, layer in objective.model.named_modules():
        mine = {}
        for own, _ in layer.named_parameters(recurse=False):
            full = f"{name}.{own}" if name else own
            canonical = space.aliases.get(full, full)
            if canonical in analysed:
                mine[own] = canonical
        if mine:
            yield name, layer, mine


def _root(parent: dict[str, str], n: str) -> str:
    while parent[n] != n:
        n = parent[n]
    return n


def _link(parent: dict[str, str], names: list[str]) -> None:
    for n in names[1:]:
        parent[_root(parent, n)] = _root(parent, names[0])


def _group(names: list[str], uses: list[Use], dense: dict[str, str]) -> Group:
    mine = set(names)
    used = tuple(u for u in uses if {u.weight, u.bias} & mine)
    modules = [u.module for u in used] + [dense[n] for n in names if n in dense]
    is_dense = any(n in dense for n in names)
    return Group(tuple(names), tuple(dict.fromkeys(modules)), () if is_dense else used, is_dense)


def _check(group: Group, objective: Objective, max_dense: int, who: str) -> None:
    if group.dense:
        size = sum(objective.params[n].numel() for n in group.names)
        if size > max_dense:
            kinds = ", ".join(sorted({type(_module(objective, m)).__name__ for m in group.modules}))
            raise ValueError(
                f"{who}: module(s) {group.label} ({kinds}) hold {size} analysed parameters that "
                "Kronecker factors do not cover (nn.Linear, Hugging Face Conv1D, nn.Conv2d with "
                "zero padding and one group, and nn.Embedding are factored), and their exact "
                f"block would be {size} x {size}, more than max_dense={max_dense} parameters. "
                "Leave them out of the Objective (params=...), or raise max_dense to form the "
                "exact block."
            )
        return
    weights = {u.weight for u in group.uses} - {None}
    biases = {u.bias for u in group.uses} - {None}
    axes = {output_axis(u.layer, objective.params[u.weight]) for u in group.uses if u.weight}
    if len(weights) > 1 or len(biases) > 1 or len(axes) > 1:
        raise ValueError(
            f"{who}: the modules {group.label} share the parameters {list(group.names)} in a "
            "way one Kronecker block cannot hold (several weights, several biases, or one weight "
            "read along different output axes); leave some of them out of the Objective "
            "(params=...)."
        )


def _module(objective: Objective, name: str) -> nn.Module:
    return objective.model.get_submodule(name)


def layout_of(group: Group, objective: Objective) -> tuple[str | None, int, str | None]:
    """``(weight, output axis, bias)`` of a factored group (names, or None when not analysed)."""
    bias = next((u.bias for u in group.uses if u.bias), None)
    for use in group.uses:
        if use.weight is not None:
            return use.weight, output_axis(use.layer, objective.params[use.weight]), bias
    return None, 0, bias


def use_columns(use: Use, objective: Objective, rows: int) -> int:
    """Columns of a use's own activation rows: the weight's inputs, and 1 for its bias."""
    cols = objective.params[use.weight].numel() // rows if use.weight is not None else 0
    return cols + (use.bias is not None)


def factor_shapes(use: Use, objective: Objective, rows: int) -> tuple[tuple[int, ...], ...]:
    """Shapes of a use's row factor ``L`` and column factor ``R`` (1-d: a diagonal)."""
    cols = use_columns(use, objective, rows)
    if use.kind == "embedding":
        return (rows,), (cols, cols)
    return (rows, rows), (cols, cols)


def group_bytes(group: Group, objective: Objective) -> int:
    """Bytes of a group's factors (dense: its exact block) in the objective's dtype."""
    item = torch.empty((), dtype=objective.dtype).element_size()
    if group.dense:
        return item * sum(objective.params[n].numel() for n in group.names) ** 2
    rows = matrix_shape(group, objective)[0]
    shapes = [s for use in group.uses for s in factor_shapes(use, objective, rows)]
    return item * sum(math.prod(s) for s in shapes)


def matrix_shape(group: Group, objective: Objective) -> tuple[int, int]:
    """``(rows, cols)`` of the matrix a factored group's Kronecker terms act on."""
    weight, axis, bias = layout_of(group, objective)
    if weight is None:
        return objective.params[str(bias)].numel(), 1
    w = objective.params[weight]
    return w.shape[axis], w.numel() // w.shape[axis] + (bias is not None)
