"""Which weights are quantized, what each is called, and its multiply-accumulates per sample."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SKIPPED = (nn.Embedding, nn.EmbeddingBag)


def quantizable(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, str]:
    """The quantizable weights of ``model``: ``{layer name: parameter name}``.

    A ``Linear`` or ``Conv`` module is one layer named by the module (``"fc1"`` holds
    ``"fc1.weight"``); any other parameter of 2 or more dimensions outside an ``Embedding`` is
    one layer named by the parameter (``"blocks.0.attn.qkv_weight"``: modules that hold their
    weight matrices directly). Biases, norms and embeddings stay in floating point.

    Args:
        model: The network.
        layers: Layer names or glob patterns to keep (default: all).

    Raises:
        ValueError: the model has no quantizable weight, or an entry of ``layers`` matches none.
    """
    found: dict[str, str] = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, _SKIPPED):
            continue
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, _WEIGHTED) and p_name == "weight":
                found[mod_name or p_name] = full
            elif not isinstance(module, _WEIGHTED) and p.dim() >= 2:
                found[full] = full
    if not found:
        raise ValueError(
            f"quant: {type(model).__name__} has no quantizable weight (Linear/Conv modules or "
            "parameters of 2 or more dimensions outside embeddings)."
        )
    return found if layers is None else {n: found[n] for n in select(found, layers)}


def select(found: Mapping[str, object], wanted: Sequence[str] | str) -> list[str]:
    """Names of ``found`` matching ``wanted`` (names or globs), in ``found``'s order."""
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    chosen: set[str] = set()
    for want in wanted:
        hits = {n for n in found if n == want or fnmatchcase(n, want)}
        if not hits:
            raise ValueError(unknown(want, found))
        chosen |= hits
    return [n for n in found if n in chosen]


def unknown(name: str, known: Sequence[str] | Mapping[str, object]) -> str:
    """The error text for a layer name that matches no quantizable layer."""
    close = difflib.get_close_matches(name, list(known), n=4, cutoff=0.5)
    module = name.rpartition(".")[0]
    if module in known and module not in close:  # a parameter name given for its module
        close.insert(0, module)
    hint = f" close matches: {', '.join(map(repr, close))};" if close else ""
    shown = ", ".join(list(known)[:12]) + (", ..." if len(known) > 12 else "")
    return (
        f"quant: unknown layer {name!r};{hint} the quantizable layers are {shown}. "
        "Use those names (hesse.quant.quantizable(model) lists them)."
    )


def macs_per_sample(
    model: nn.Module, layers: Mapping[str, str], run: Callable[[], object]
) -> dict[str, int]:
    """Multiply-accumulates of each layer's weight per sample, measured on one forward pass.

    A weight is assumed to be applied once per output position of the module that holds it:
    ``numel * positions``, with positions the spatial size of a conv output and, for other
    modules, the output's elements per sample divided by its last dimension (a ``Linear`` or
    an attention module on ``(B, T, W)`` has ``T``).

    Args:
        model: The network the layers belong to.
        layers: ``{layer: parameter name}`` as :func:`quantizable` returns.
        run: Runs one forward pass of ``model`` (e.g. one batch's loss).
    """
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    positions: dict[str, int] = {}

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: object, out: object) -> None:
            out = out[0] if isinstance(out, tuple) else out
            if isinstance(module, _WEIGHTED[1:]):
                positions[name] = int(out[0, 0].numel())
            else:
                positions[name] = int(out[0].numel() // out.shape[-1])

        return record

    owners = {p.rpartition(".")[0] for p in layers.values()}
    handles = [modules[o].register_forward_hook(hook(o)) for o in owners]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return {
        n: params[p].numel() * positions.get(p.rpartition(".")[0], 1) for n, p in layers.items()
    }
