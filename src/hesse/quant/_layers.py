"""Which weights are quantized, what each is called, and its multiply-accumulates per sample."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import cast

import torch
from torch import nn

from ..problem._blocks import module_prefixes
from ..problem._calibration_memory import run_hooked
from ..problem._positions import sample_count
from ..problem._weights import is_hf_conv1d, output_axis

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SKIPPED = (nn.Embedding, nn.EmbeddingBag)


def quantizable(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, str]:
    """The quantizable weights of ``model``: ``{layer name: parameter name}``.

    A ``Linear``, ``Conv`` or Hugging Face ``Conv1D`` module is one layer named by the module
    (``"fc1"`` holds ``"fc1.weight"``); any other parameter of 2 or more dimensions outside an
    ``Embedding`` is one layer named by the parameter (``"blocks.0.attn.qkv_weight"``: modules
    that hold their weight matrices directly). Biases, norms and embeddings stay in floating
    point. A weight tied to others is one layer, listed once, under the first module that
    applies it as a matrix, with the parameter name PyTorch gives it: a masked LM's decoder
    sharing the word embeddings is ``{"cls.predictions.decoder":
    "bert.embeddings.word_embeddings.weight"}``, and quantizing it quantizes every use of the
    weight, the embedding's included.

    Args:
        model: The network.
        layers: Layer names or glob patterns to keep (default: all).

    Raises:
        ValueError: the model has no quantizable weight, or an entry of ``layers`` matches none.
    """
    found = {name: param for name, (param, _) in _scan(model).items()}
    if not found:
        raise ValueError(
            f"quant: {type(model).__name__} has no quantizable weight (Linear/Conv modules or "
            "parameters of 2 or more dimensions outside embeddings)."
        )
    return found if layers is None else {n: found[n] for n in select(found, layers)}


def _scan(model: nn.Module) -> dict[str, tuple[str, str]]:
    """``{layer: (parameter name, name of the module that applies it)}`` (see quantizable)."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    found: dict[str, tuple[str, str]] = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, _SKIPPED):
            continue
        weighted = _weighted(module)
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen or (weighted and p_name != "weight") or p.dim() < 2:
                continue
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            found[(mod_name or p_name) if weighted else full] = (canonical[id(p)], mod_name)
            seen.add(id(p))
    return found


def _weighted(module: nn.Module) -> bool:
    return isinstance(module, _WEIGHTED) or is_hf_conv1d(module)


def output_axes(model: nn.Module, layers: Mapping[str, str]) -> dict[str, int]:
    """The output axis of each layer's weight (:func:`hesse.problem._weights.output_axis`)."""
    owners, modules = _scan(model), dict(model.named_modules())
    params = dict(model.named_parameters())
    return {n: output_axis(modules[owners[n][1]], params[p]) for n, p in layers.items()}


def tied(model: nn.Module, layers: Mapping[str, str]) -> list[str]:
    """The layers whose weight is also reachable under another name (tied weights)."""
    names: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        names[id(p)] = names.get(id(p), 0) + 1
    params = dict(model.named_parameters())
    return [n for n, p in layers.items() if names[id(params[p])] > 1]


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
    model: nn.Module, layers: Mapping[str, str], run: Callable[[], object], samples: int
) -> dict[str, int]:
    """Multiply-accumulates of each layer's weight per sample, measured on one forward pass.

    Each output unit a module computes is one dot product with a row of its weight, so a
    layer costs ``weight.numel() * applications``, where the applications are the output's
    elements divided by its units: ``weight.shape[output axis]`` for ``Linear``, ``Conv`` and
    ``Conv1D`` (a conv's spatial positions, a sequence's tokens in any layout), the last
    dimension for a module that holds its matrices directly. A module whose forward never
    runs (``MultiheadAttention`` applies ``out_proj`` by ``F.linear``; a fused fast path runs
    none of its sub-modules) is counted at the output of its nearest ancestor that runs.
    Calls are summed and divided by the batch's ``samples``, so the layout of the
    activations (``batch_first`` or not) does not matter.

    Args:
        model: The network the layers belong to.
        layers: ``{layer: parameter name}`` as :func:`quantizable` returns.
        run: Runs one forward pass of ``model`` (e.g. one batch's loss).
        samples: The samples in that batch.
    """
    modules = dict(model.named_modules())
    owners = {n: o for n, (_, o) in _scan(model).items() if n in layers}
    chains = {n: ["", *module_prefixes(o), o] if o else [""] for n, o in owners.items()}
    applications: dict[str, float] = {}

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: object, out: object) -> None:
            y = _first_tensor(out)
            if y is not None and y.dim() > 0:
                applications[name] = applications.get(name, 0) + y.numel() / _units(module, y)

        return record

    hooked = {m for chain in chains.values() for m in chain}
    run_hooked([modules[m].register_forward_hook(hook(m)) for m in hooked], run)
    params = dict(model.named_parameters())
    out = {}
    for name, chain in chains.items():
        ran = next((applications[m] for m in reversed(chain) if m in applications), samples)
        out[name] = round(params[layers[name]].numel() * ran / samples)
    return out


def batch_samples(batch: object) -> int:
    """The samples of a batch (dim 0 of its first tensor; 1 for a batch without tensors)."""
    return sample_count(batch) or 1


def _units(module: nn.Module, y: torch.Tensor) -> int:
    """The output units of one application: the weight's outputs, or the last dimension."""
    if _weighted(module):
        weight = cast(torch.Tensor, module.weight)  # a Linear's, ConvNd's or Conv1D's matrix
        return weight.shape[output_axis(module, weight)]
    return y.shape[-1]


def _first_tensor(out: object) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if not isinstance(out, (Mapping, tuple, list)):
        return None
    items = out.values() if isinstance(out, Mapping) else out
    return next((t for t in map(_first_tensor, items) if t is not None), None)
