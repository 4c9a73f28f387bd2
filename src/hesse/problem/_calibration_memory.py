r"""What a GPTQ or SparseGPT calibration holds at its peak, before it runs.

Both compressors walk the model group by group (a transformer block, or one layer); for the
group being compressed they hold its float64 input Hessians, and for the layer being swept
the OBS working set. Measured on MiniLM-L6 (``benchmarks/compress/memory.py``): one sweep of
the 1536-input MLP layer raised the peak by 112 MiB, six ``(in, in)`` float64 arrays (the
permuted Hessian, its damped copy, the identity, the damped sum, the Cholesky factor of
:math:`(H + \lambda I)^{-1}` and its upper factor, 18 MiB each) and a few ``(out, in)`` ones,
for GPTQ's and SparseGPT's sweeps alike; a forward pass of one batch of 16 x 64 tokens raised
it by 30 MiB, five times the largest module output (the 1536-wide MLP activations).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SWEEP_SQUARES = 6
"""float64 ``(in, in)`` arrays alive in an OBS column sweep besides the layer's Hessian."""
SWEEP_RECTS = 5
"""float64 ``(out, in)`` arrays alive in a sweep: the weight as rows, its permuted working copy,
the codes (or mask), a candidate and its difference."""
RECORD_SQUARES = 1.5
"""``(in, in)`` float64 arrays of transient products while Hessians are recorded: the batch's
:math:`X^\top X` in float64, and in float32 before it is cast."""
ACTIVATION_COPIES = 5
"""One batch's forward activations, in multiples of the largest module output."""
METHODS = ("gptq", "sparsegpt")


@dataclass(frozen=True)
class CalibrationMemory:
    r"""Bytes of a GPTQ or SparseGPT run at its peak, item by item.

    .. math::
        M = m_{\text{model}} + m_{\text{copy}} + m_{\text{results}} + m_{\text{stored}}
          + m_H + \max\big(m_{\text{record}},\ m_{\text{sweep}}\big)

    Attributes:
        method: ``"gptq"`` or ``"sparsegpt"``.
        model_bytes: The model's parameters and buffers (resident before the run).
        copy_bytes: GPTQ's quantized copy of the model (0 for SparseGPT, which returns weights).
        results_bytes: What the run accumulates: GPTQ's integer codes (float64, 8 bytes per
            quantized weight, plus scales); SparseGPT's pruned weights and boolean masks.
        stored_bytes: Stored block inputs and outputs of every calibration batch (the chain
            of blocks; 0 without one).
        hessian_bytes: The float64 input Hessians of the largest group (``group``).
        record_bytes: Transients while a group's Hessians are recorded: one batch's activations
            (``activation_bytes``) and ``RECORD_SQUARES`` products of the widest input.
        sweep_bytes: The widest layer's sweep working set (``SWEEP_SQUARES`` ``(in, in)`` and
            ``SWEEP_RECTS`` ``(out, in)`` float64 arrays).
        activation_bytes: One batch's forward activations (measured; 0 when not measured).
        group: The group whose Hessians are largest (a block's name, or a layer's).
        total: ``M``.
    """

    method: str
    model_bytes: int
    copy_bytes: int
    results_bytes: int
    stored_bytes: int
    hessian_bytes: int
    record_bytes: int
    sweep_bytes: int
    activation_bytes: int
    group: str
    total: int

    @property
    def extra_bytes(self) -> int:
        """``total`` less the model: the rise of the process's peak that the run causes."""
        return self.total - self.model_bytes

    def __str__(self) -> str:
        m = _mib
        return (
            f"{self.method} peak ~ {m(self.total)} (+{m(self.extra_bytes)} beyond the model "
            f"{m(self.model_bytes)}): copy {m(self.copy_bytes)}, results "
            f"{m(self.results_bytes)}, stored states {m(self.stored_bytes)}, Hessians of "
            f"{self.group or 'all layers'} {m(self.hessian_bytes)}, max(record "
            f"{m(self.record_bytes)}, sweep {m(self.sweep_bytes)})"
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def calibration_memory(
    model: nn.Module,
    layers: Sequence[tuple[str, int, int]],
    *,
    method: str = "gptq",
    activations: int = 0,
    stored: int = 0,
    group_size: int | None = 128,
) -> CalibrationMemory:
    """The peak of a GPTQ or SparseGPT run over ``layers``, before it runs.

    Args:
        model: The network (its parameters and buffers are ``model_bytes``).
        layers: ``(group, out, in)`` of each compressed weight: its calibration group (a
            block, or the layer itself), output units and inputs per output.
        method: ``"gptq"`` or ``"sparsegpt"``.
        activations: One batch's forward activations (:func:`activation_bytes`), or 0.
        stored: Stored block states (inputs and outputs of every batch), or 0.
        group_size: GPTQ's inputs per scale (for the scales' bytes).

    Raises:
        ValueError: an unknown ``method``, or no layers.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> m = calibration_memory(net, [("0", 16, 8), ("2", 2, 16)])
        >>> m.hessian_bytes == 16 * 16 * 8, m.group, m.sweep_bytes == 8 * (6 * 16 * 16 + 5 * 32)
        (True, '2', True)
    """
    if method not in METHODS:
        raise ValueError(f"calibration_memory: method must be one of {METHODS}, got {method!r}.")
    if not layers:
        raise ValueError("calibration_memory: no layers to compress.")
    tensors = [*model.parameters(), *model.buffers()]
    model_bytes = sum(t.numel() * t.element_size() for t in tensors)
    item = next(iter(model.parameters())).element_size()
    sizes: dict[str, int] = {}
    for g, _, n_in in layers:
        sizes[g] = sizes.get(g, 0) + 8 * n_in * n_in
    group = max(sizes, key=lambda g: sizes[g])  # the first of equal groups
    weights = sum(o * i for _, o, i in layers)
    if method == "gptq":
        copy = model_bytes
        scales = sum(o * (i // group_size if group_size and i % group_size == 0 else 1)
                     for _, o, i in layers)  # fmt: skip
        results = 8 * weights + 16 * scales
    else:
        copy, results = 0, (item + 1) * weights
    widest = max(i for _, _, i in layers)
    record = activations + int(RECORD_SQUARES * 8 * widest * widest)
    sweep = max(8 * (SWEEP_SQUARES * i * i + SWEEP_RECTS * o * i) for _, o, i in layers)
    total = model_bytes + copy + results + stored + sizes[group] + max(record, sweep)
    return CalibrationMemory(method, model_bytes, copy, results, stored, sizes[group], record,
                             sweep, activations, group, total)  # fmt: skip


def module_outputs(model: nn.Module, run: Callable[[], Any]) -> dict[str, int]:
    """``{leaf module: bytes of its output}`` in one forward pass (``run()``, under no_grad)."""
    found: dict[str, int] = {}

    def hook_of(name: str) -> Callable:
        def hook(module: nn.Module, args: object, out: object) -> None:
            t = out[0] if isinstance(out, (tuple, list)) and out else out
            if isinstance(t, torch.Tensor):
                found[name] = max(found.get(name, 0), t.numel() * t.element_size())

        return hook

    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    run_hooked([m.register_forward_hook(hook_of(n)) for n, m in leaves], run)
    return found


def run_hooked(handles: Sequence[Any], run: Callable[[], Any]) -> None:
    """``run()`` under ``torch.no_grad()``, then remove the hooks' ``handles`` (on errors too)."""
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()


def activation_bytes(outputs: dict[str, int], prefixes: Sequence[str] | None = None) -> int:
    """``ACTIVATION_COPIES`` x the largest output among modules under ``prefixes`` (None: all).

    A pass through one block (the chain) holds that block's activations; a full pass, the
    whole model's (a language model's logits, often the largest).
    """
    sizes = [b for n, b in outputs.items() if prefixes is None or n.startswith(tuple(prefixes))]
    return ACTIVATION_COPIES * max(sizes, default=0)
