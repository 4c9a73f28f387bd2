"""Which parameters of a model a ``params=`` selection names.

A selection holds parameter names, module prefixes and glob patterns (resolved by
:meth:`hesse.problem.params.ParamSpace.select`), and ``Parameter`` or ``Module`` objects of
the model, which stand for their names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .params import ParamSpace

Selection = str | torch.Tensor | nn.Module | Sequence[str | torch.Tensor | nn.Module]


def choose(model: nn.Module, selection: Selection | None) -> tuple[list[str], dict[str, Any]]:
    """The parameters an ``Objective`` analyses: those of ``params=``, else all trainable ones.

    Args:
        model: The network.
        selection: What ``params=`` takes (see :func:`names_of`), or None for every parameter
            with ``requires_grad``.

    Returns:
        ``(chosen, named)``: the names of the analysed parameters in the model's order, and
        ``{name: parameter}`` of every trainable parameter.

    Raises:
        ValueError: no trainable parameter, a selection that matches none, or a complex one.
    """
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not named:
        raise ValueError(
            "Objective: the model has no trainable parameters (none with requires_grad); "
            "unfreeze some with p.requires_grad_(True) or name them with params=."
        )
    chosen = list(named)
    if selection is not None:
        space = ParamSpace.from_named(named, aliases(model))
        chosen = resolve(model, selection, space, caller="Objective(params=)")
    for n in chosen:
        if named[n].is_complex():
            raise ValueError(
                f"Objective: parameter {n!r} is complex ({named[n].dtype}); the curvature "
                "is defined for real parameters (the imaginary part would be dropped). Leave "
                "it out with params=, or store it as two real parameters."
            )
    return chosen, named


def resolve(model: nn.Module, selection: Selection, space: ParamSpace, *, caller: str) -> list[str]:
    """The names of ``space`` that ``selection`` picks, in the space's order.

    The one resolution of a ``params=`` selection: :func:`names_of` turns objects into names,
    :meth:`ParamSpace.select` resolves names, prefixes and patterns, and an entry that matches
    only parameters outside ``space`` (frozen, or not analysed) is named as such.

    Args:
        model: The network the selection refers to.
        selection: What ``params=`` takes (see :func:`names_of`).
        space: The parameters that may be chosen.
        caller: The call and argument the errors start with (``"Objective(params=)"``).

    Raises:
        ValueError: an entry that matches nothing in ``space``, or an object that is not the
            model's; the message starts with ``caller``.
    """
    candidates = dict.fromkeys(space.names)
    others = [n for n, _ in model.named_parameters() if n not in candidates]
    wanted = names_of(model, selection, candidates, caller=caller)
    try:
        return space.select(wanted, others=others)
    except ValueError as err:
        raise ValueError(f"{caller}: {err}") from None


def names_of(
    model: nn.Module, selection: Selection, candidates: Mapping[str, Any], *, caller: str
) -> list[str]:
    """Names and patterns of a selection, with ``Parameter``/``Module`` objects resolved.

    Args:
        model: The network whose parameters and modules the selection may hold.
        selection: Parameter names, module prefixes or glob patterns (kept as they are, for
            :meth:`~hesse.problem.params.ParamSpace.select`), ``Parameter`` or ``Module`` objects of
            ``model``, or a list of them.
        candidates: The parameters a module may stand for (trainable, or analysed), by name.
        caller: The call and argument the errors name (``"Objective(params=)"``).

    Returns:
        The names and patterns, in the selection's order; a module gives its parameters among
        ``candidates``.

    Raises:
        ValueError: a tensor or a module that is not the model's, a module without candidate
            parameters, or an item of another type.
    """
    if isinstance(selection, (str, torch.Tensor, nn.Module)):
        selection = [selection]
    by_id = {id(p): n for n, p in model.named_parameters()}
    names: list[str] = []
    for item in selection:
        if isinstance(item, str):
            names.append(item)
        elif isinstance(item, torch.Tensor):
            if id(item) not in by_id:
                raise ValueError(
                    f"{caller}: a tensor of shape {tuple(item.shape)} is not a parameter of this "
                    "model; pass the model's own parameters or names."
                )
            names.append(by_id[id(item)])
        elif isinstance(item, nn.Module):
            names.extend(_module_names(model, item, by_id, candidates, caller))
        else:
            raise ValueError(
                f"{caller}: takes names, patterns, Parameters and Modules; got "
                f"{type(item).__name__}."
            )
    return names


def aliases(model: nn.Module) -> dict[str, str]:
    """Other names of shared parameters (tied weights), ``{alias: name}``."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    pairs = model.named_parameters(remove_duplicate=False)
    return {a: by_id[id(p)] for a, p in pairs if by_id[id(p)] != a}


def _module_names(
    model: nn.Module,
    module: nn.Module,
    by_id: dict[int, str],
    candidates: Mapping[str, Any],
    caller: str,
) -> list[str]:
    if not any(module is m for m in model.modules()):
        raise ValueError(
            f"{caller}: the {type(module).__name__} is not a submodule of the model; pass the "
            "model's own modules or their names."
        )
    names = [by_id[id(p)] for p in module.parameters() if by_id[id(p)] in candidates]
    if not names:
        raise ValueError(
            f"{caller}: the {type(module).__name__} selected has no parameter that may be "
            "analysed here (its parameters are frozen, or not analysed by this objective)."
        )
    return names
