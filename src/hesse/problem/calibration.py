r"""Layer-input calibration, block by block, for GPTQ and SparseGPT, and its memory model.

One calibrator for the two one-shot compressors (:func:`hesse.quant.gptq`,
``hesse.prune.prune(..., method="sparsegpt")``): both need each layer's input Hessian
:math:`H = 2 X X^\top / n` from calibration data that flowed through the blocks already
compressed (Frantar et al. 2023, GPTQ; Frantar & Alistarh 2023, SparseGPT, Sec. 3), one
transformer block at a time so that only that block's Hessians are held.

- :func:`blocks` finds the chain of blocks (the children of the model's ``nn.ModuleList`` with
  the most parameters); :func:`capture` stores the first block's inputs for every batch;
  :func:`run_block` runs a block on stored inputs and returns its outputs, the next block's
  inputs. Both compressors walk this chain (:class:`BlockChain`).
- :func:`hessians` records :math:`2XX^\top/n` of given modules by forward pre-hooks, from
  full passes over the data that may stop after a module (layers outside the chain, models
  without one); :func:`groups` groups layers by the transformer block that holds them.
- :func:`calibration_memory` is what a run will hold at its peak, item by item
  (:class:`CalibrationMemory`), from the layer shapes and one measured batch; it sits in this
  low layer so that :func:`hesse.plan` (``compress="gptq"``) can plan a run too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ._blocks import _layers
from ._calibration_memory import (
    ACTIVATION_COPIES,
    RECORD_SQUARES,
    SWEEP_RECTS,
    SWEEP_SQUARES,
    CalibrationMemory,
    activation_bytes,
    calibration_memory,
    module_outputs,
)
from ._calls import call_model
from ._weights import is_hf_conv1d, output_axis

Inputs = list[tuple[tuple, dict]]
"""Stored block inputs: ``(args, kwargs)`` per calibration batch."""


class _Stop(Exception):
    """Raised by a forward hook to end a calibration pass early."""


# ---------------------------------------------------------------- the chain of blocks


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(prefix, block)`` of the children of the ``ModuleList`` with the most parameters."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return []
    name, best = max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
    return [(f"{name}.{i}." if name else f"{i}.", child) for i, child in enumerate(best)]


def capture(passes: Iterable[Callable[[], Any]], first: nn.Module, who: str) -> Inputs:
    """The positional and keyword inputs of ``first`` in each pass (the rest is not run).

    Args:
        passes: One callable per calibration batch that runs the model on it.
        first: The first block.
        who: The caller, for the error.

    Raises:
        ValueError: a pass never called ``first``.
    """
    store: Inputs = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        store.append((tuple(_keep(a) for a in args), {k: _keep(v) for k, v in kwargs.items()}))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for run in passes:
                try:
                    run()
                except _Stop:
                    continue
                raise ValueError(
                    f"{who}: the model's forward never called its first block "
                    f"({type(first).__name__}); pass sequential=False to calibrate in one pass."
                )
    finally:
        handle.remove()
    return store


def _keep(value: Any) -> Any:
    """A captured block input: tensors detached; a key-value cache dropped, as it would grow."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    cache = any(c.__module__.startswith("transformers.cache") for c in type(value).__mro__)
    return None if cache else value


def run_block(
    block: nn.Module, values: Mapping[str, torch.Tensor] | None, inputs: Inputs
) -> list[torch.Tensor]:
    """The block's output (its first element, when a tuple) on each stored input.

    ``values``: the block's parameters and buffers by local name (``functional_call``), or None
    for the block's own.
    """
    outputs = []
    with torch.no_grad():
        for args, kwargs in inputs:
            kwargs = kwargs | ({"use_cache": False} if "use_cache" in kwargs else {})
            out = block(*args, **kwargs) if values is None else functional_call(
                block, dict(values), args, kwargs
            )  # fmt: skip
            outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outputs


def advance(inputs: Inputs, outputs: list[torch.Tensor]) -> Inputs:
    """The next block's inputs: each output in place of the first positional input."""
    return [((y, *a[1:]), k) for y, (a, k) in zip(outputs, inputs, strict=True)]


@dataclass
class BlockChain:
    """The walk both compressors make: a block's inputs, held while it is compressed.

    Attributes:
        inputs: The current block's stored inputs (one entry per calibration batch).
        peak: Largest calibration state held so far (bytes): stored inputs, outputs and the
            block's Hessians.
    """

    inputs: Inputs
    peak: int = 0

    def step(self, block: nn.Module, values: Mapping[str, torch.Tensor] | None, held: int) -> None:
        """Run ``block`` (its compressed weights in ``values``) and move to the next block."""
        outputs = run_block(block, values, self.inputs)
        self.peak = max(self.peak, tensor_bytes(self.inputs) + tensor_bytes(outputs) + held)
        self.inputs = advance(self.inputs, outputs)


# ---------------------------------------------------------------- Hessians of full passes


def groups(layers: Mapping[str, str], owners: Mapping[str, str]) -> list[tuple[str, list[str]]]:
    """``[(block module name or "", [layer, ...]), ...]`` in the order the layers are listed.

    Layers are grouped by the transformer layer that holds them (``bert.encoder.layer.3``);
    layers outside every transformer layer form a last group ``""``; a model without
    transformer layers has one group per layer (named by its module).

    Args:
        layers: ``{layer: parameter name}``.
        owners: ``{layer: name of the module that applies it}``.
    """
    found: dict[str, list[str]] = {}
    rest: list[str] = []
    for name in layers:
        spans = _layers(owners[name] + ".weight")
        if spans:
            found.setdefault(spans[0][0], []).append(name)
        else:
            rest.append(name)
    out = list(found.items())
    if not out:
        return [(owners[n], [n]) for n in rest]
    return out + ([("", rest)] if rest else [])


def hessians(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    data: Iterable,
    stop: nn.Module | None,
    run: Callable[[Any], Any] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    r"""``({layer: H}, {layer: n})``: :math:`H = 2 X X^\top / n` of each module's inputs.

    Args:
        model: The network, run on each batch under ``torch.no_grad()``.
        modules: ``{layer: module}`` (``Linear``, ``Conv2d`` or Hugging Face ``Conv1D``).
        data: Calibration batches (or stored block inputs, with ``run``).
        stop: A module after whose forward the pass ends (None: the whole model).
        run: ``run(batch)`` instead of ``model(batch)`` (e.g. a block on its stored inputs).

    Raises:
        ValueError: a layer saw no input (its module never ran on the data).
    """
    gram: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    last: dict[str, Any] = {}
    hooks = {n: _recorder(n, gram, rows, last) for n in modules}
    handles = [m.register_forward_pre_hook(hooks[n]) for n, m in modules.items()]
    if stop is not None:
        handles.append(stop.register_forward_hook(_raise))
    call = run or (lambda batch: call_model(model, batch))
    try:
        with torch.no_grad():
            for batch in data:
                try:
                    call(batch)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    last.clear()
    missing = [n for n in modules if n not in gram]
    if missing:
        raise ValueError(
            f"gptq: no calibration inputs reached {missing[:3]}; the model's forward never ran "
            "those modules on the data (is the data empty, or are they unused?)."
        )
    return {n: g.mul_(2).div_(rows[n]) for n, g in gram.items()}, rows  # in place: 2 g / n


def _raise(module: nn.Module, args: object, out: object) -> None:
    raise _Stop


def _recorder(name: str, gram: dict, rows: dict, last: dict) -> Callable:
    r"""A pre-hook adding the batch's :math:`X X^\top` to ``gram[name]``.

    The product is taken in the inputs' dtype (float32 for a float32 model: the float64 product
    took half of GPTQ's time on MiniLM) and summed over batches in float64. Layers fed the same
    tensor (an attention's query, key and value) share one product (``last``).
    """

    def record(module: nn.Module, args: tuple) -> None:
        x = args[0]
        if last.get("x") is not x or last.get("kind") is not type(module):
            last.clear()  # the previous product is freed before the next is formed
            X = input_rows(module, x).detach()
            last.update(x=x, kind=type(module), G=(X.T @ X).to(torch.float64), n=X.shape[0])
        if name in gram:
            gram[name].add_(last["G"])
        else:
            gram[name] = last["G"].clone()
        rows[name] = rows.get(name, 0) + last["n"]

    return record


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A module's inputs as rows ``(n, in)``: tokens, or a convolution's unfolded patches."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or isinstance(module.padding, str):
            raise ValueError(
                "gptq: grouped convolutions and string padding ('same') are not supported; "
                f"got groups={module.groups}, padding={module.padding!r}."
            )
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


# ---------------------------------------------------------------- bytes


def tensor_bytes(items: Any) -> int:
    """Bytes of the tensors in nested lists, tuples and dicts."""
    if isinstance(items, torch.Tensor):
        return items.numel() * items.element_size()
    if isinstance(items, Mapping):
        return sum(tensor_bytes(v) for v in items.values())
    if isinstance(items, (list, tuple)):
        return sum(tensor_bytes(v) for v in items)
    return 0


def peak_rss() -> int:
    """Peak resident set size of this process in bytes; 0 without ``resource`` (Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB, macOS: bytes
    return int(peak if sys.platform == "darwin" else peak * 1024)


def plan_calibration(
    objective: Any, method: str = "gptq", *, sequential: bool = True
) -> CalibrationMemory:
    """The peak of ``gptq`` / ``sparsegpt`` on ``objective``'s weights and data, before the run.

    The compressed weights: those of the objective's ``Linear``, ``Conv1d``/``Conv2d`` and
    Hugging Face ``Conv1D`` modules (embeddings and norms stay). Groups: GPTQ's transformer
    blocks (:func:`groups`), SparseGPT's links of the chain (:func:`blocks`); one group of every
    layer with ``sequential=False``. Activations and stored block states are measured on the
    first batch (the stored states times the batches).

    Args:
        objective: An :class:`~hesse.Objective` (model, loss and calibration batches).
        method: ``"gptq"`` or ``"sparsegpt"``.
        sequential: As for the compressor.

    Raises:
        ValueError: an unknown ``method``; no compressible weight among the objective's.
    """
    model = objective.model
    found = _weights(model, objective.params)
    if not found:
        raise ValueError(
            f"plan(compress={method!r}): the objective analyses no Linear/Conv weight to "
            "compress; build it with params= that include them (or leave params= out)."
        )
    links = blocks(model) if sequential else []
    if method == "gptq" and sequential:
        owners = {n: n.rpartition(".")[0] for n in found}
        group = {n: g for g, names in groups(dict.fromkeys(found, ""), owners) for n in names}
    else:
        group = {n: next((p for p, _ in links if n.startswith(p)), "") for n in found}
    shapes = [(group[n], o, i) for n, (o, i) in found.items()]
    first = next(iter(objective.batches()))
    run = lambda: objective.batch_loss(objective.params, first)  # noqa: E731
    outputs = module_outputs(model, run)
    chained = bool(links) and any(g for g, _, _ in shapes)
    full_pass = not chained or any(not g for g, _, _ in shapes)
    activations = activation_bytes(outputs, None if full_pass else [p for p, _ in links])
    stored = 0
    if chained:
        held = capture([run], links[0][1], f"plan(compress={method!r})")
        one = tensor_bytes(held) + tensor_bytes([a[0] for a, _ in held])  # inputs, outputs
        stored = one * sum(1 for _ in objective.batches())
    return calibration_memory(model, shapes, method=method, activations=activations,
                              stored=stored)  # fmt: skip


def _weights(model: nn.Module, analysed: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """``{weight: (out, in)}`` of the compressible modules whose weight is analysed."""
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and not is_hf_conv1d(module):
            continue
        full = f"{name}.weight" if name else "weight"
        if full in analysed:
            W = analysed[full]
            rows = W.shape[output_axis(module, W)]
            out[full] = (rows, W.numel() // rows)
    return out


__all__ = [
    "ACTIVATION_COPIES",
    "RECORD_SQUARES",
    "SWEEP_RECTS",
    "SWEEP_SQUARES",
    "BlockChain",
    "CalibrationMemory",
    "Inputs",
    "activation_bytes",
    "advance",
    "blocks",
    "calibration_memory",
    "module_outputs",
    "capture",
    "groups",
    "hessians",
    "input_rows",
    "peak_rss",
    "plan_calibration",
    "run_block",
    "tensor_bytes",
]
