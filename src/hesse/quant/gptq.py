r"""GPTQ on a whole model: layer Hessians from calibration data, one transformer block at a time.

Frantar, Ashkboos, Hoefler & Alistarh 2023, "GPTQ: Accurate post-training quantization for
generative pre-trained transformers" (ICLR). The layer sweep is :func:`gptq_layer`; this module
runs it over a model, sequentially, and keeps the integer codes so that :func:`hesse.quant.save`
can write a packed checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ._calibrate import group_hessians, groups
from ._gptq_layer import GptqLayerResult, gptq_layer
from ._layers import _scan, output_axes, quantizable, tied, unknown
from .quantizer import Codes, Quantizer, check_bits

ATTRIBUTE = "hesse_quantization"


@dataclass(frozen=True)
class GptqLayer:
    r"""What GPTQ did to one layer.

    Attributes:
        name: The layer (:func:`hesse.quant.quantizable`).
        parameter: Its weight's parameter name.
        bits: Code width.
        group_size: Inputs per grid (None: one grid per output unit).
        error: :math:`\mathrm{tr}((W - \hat W) H (W - \hat W)^\top)` of the returned weight.
        rtn_error: The same for round-to-nearest on the same grid.
        rule: ``"gptq"`` or ``"rtn"`` (round-to-nearest won and was kept).
        relative_damping: The damping used, relative to :math:`\mathrm{mean}\,\mathrm{diag}\,H`.
        trace: :math:`\mathrm{tr}\,H`, the scale of the layer's inputs.
        inputs: Calibration rows :math:`n` the Hessian was averaged over.
    """

    name: str
    parameter: str
    bits: int
    group_size: int | None
    error: float
    rtn_error: float
    rule: str
    relative_damping: float
    trace: float
    inputs: int


@dataclass(frozen=True)
class Quantization:
    """The integer form of a quantized copy, kept on it as ``model.hesse_quantization``.

    Attributes:
        codes: ``{parameter name: Codes}`` of every quantized weight (layers and embeddings).
        symmetric: Whether the grids are symmetric.
        layers: Per-layer GPTQ diagnostics, in the order they were quantized.
        embeddings: Parameter names of the embeddings rounded to nearest per row.
        hessian_bytes: The most bytes of layer Hessians held at one time (one block's).
    """

    codes: Mapping[str, Codes]
    symmetric: bool
    layers: tuple[GptqLayer, ...]
    embeddings: tuple[str, ...]
    hessian_bytes: int


def gptq(
    model: nn.Module,
    calib: Iterable,
    bits: int | Mapping[str, int] = 4,
    *,
    group_size: int | None = 128,
    symmetric: bool = True,
    act_order: bool = True,
    damping: float = 0.01,
    sequential: bool = True,
    block: int = 128,
    embeddings: int | None = 8,
    full_range: bool = True,
) -> nn.Module:
    r"""A GPTQ-quantized copy of ``model`` (Frantar et al. 2023); ``model`` is not modified.

    Each layer's input Hessian :math:`H = 2 X X^\top / n` is accumulated from ``calib``, then
    :func:`gptq_layer` rounds its weight column by column, spreading each rounding error over
    the columns not yet rounded. With ``sequential=True`` the layers are taken one transformer
    block at a time and each block's inputs are computed through the blocks already quantized
    (and the embeddings as quantized), so only one block's Hessians are held at a time
    (``hessian_bytes``); ``sequential=False`` records every Hessian on the float model in one
    pass. A group size that does not divide a layer's inputs gives that layer one grid per output
    unit (``GptqLayer.group_size`` says so). A weight tied to an embedding (a tied LM head) is
    not a GPTQ layer: it is quantized once, as an embedding.

    Embeddings (``nn.Embedding``) are rounded to nearest with one grid per row (per token) at
    ``embeddings`` bits, the step rounded up to a power of two: then every level
    :math:`s q` (:math:`|q| < 2^8`) is exact in bfloat16, and :func:`hesse.quant.save` stores
    them in 2 bytes each (transformers cannot load packed embeddings). None leaves them in
    float.

    The copy holds fake-quantized weights :math:`s(q - z)` (scales rounded to the weight's
    dtype) and, as ``hesse_quantization``, a :class:`Quantization` with the integer codes.

    Args:
        model: The network (Linear, Conv2d or Hugging Face Conv1D layers).
        calib: Calibration batches: dicts (``model(**batch)`` less ``labels``), tuples
            (``model(batch[0])``) or tensors; stored as a list (the first block's inputs are
            kept for every batch; models without a chain of blocks take one pass per layer).
        bits: One width for every layer, or ``{layer: bits}`` (e.g. ``Allocation.bits``); layers
            not in the dict stay in float.
        group_size: Inputs per grid, or None for one grid per output unit.
        symmetric: Symmetric grids or asymmetric (zero points).
        act_order: Visit columns by decreasing :math:`H_{qq}` (groups keep the original order).
        damping: Relative damping of :math:`H`, 0.01 as in the paper.
        sequential: Calibrate each block through the blocks already quantized.
        block: Columns per lazy update block.
        embeddings: Width for the embeddings, or None.
        full_range: Symmetric grids with all :math:`2^b` codes
            :math:`-2^{b-1}..2^{b-1}-1`, step :math:`\max|w| / (2^{b-1} - \tfrac12)`, as
            compressed-tensors (the format :func:`hesse.quant.save` writes) and llm-compressor
            use them (the default); False: hesse's narrow grid, codes :math:`-L..L`,
            :math:`L = 2^{b-1} - 1`, step :math:`\max|w|/L` (:func:`gptq_layer`). The full
            range has one more level, so a smaller step: on MiniLM it matches or beats
            llm-compressor, the narrow grid does not (``benchmarks/compress/RESULTS.md``).

    Returns:
        The quantized copy, in eval mode.

    Raises:
        ValueError: an unknown layer name, bits outside 2-16, a layer the calibration never
            reaches, a weight applied outside Linear/Conv2d/Conv1D modules.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> q = gptq(net, [torch.randn(64, 8)], bits=3, group_size=8)
        >>> [(l.name, l.bits, l.error <= l.rtn_error) for l in q.hesse_quantization.layers]
        [('0', 3, True), ('2', 3, True)]
    """
    widths = _widths(model, bits)
    out = copy.deepcopy(model).eval()
    codes: dict[str, Codes] = {}
    emb = _embeddings(out, embeddings, symmetric, codes)
    layers = quantizable(out)
    owners = {n: o for n, (_, o) in _scan(out).items()}
    modules = dict(out.named_modules())
    params = dict(out.named_parameters())
    axes = output_axes(out, layers)
    done: list[GptqLayer] = []
    peak = 0
    plan = groups({n: layers[n] for n in widths}, owners)
    if not sequential:
        plan = [("", [n for _, names in plan for n in names])]
    for names, Hs, rows in group_hessians(out, plan, modules, owners, list(calib)):
        peak = max(peak, sum(H.numel() * H.element_size() for H in Hs.values()))
        for n in names:
            p = params[layers[n]]
            size = group_size if group_size and p[0].numel() % group_size == 0 else None
            H = Hs.pop(n)
            r = gptq_layer(p, H, bits=widths[n], group_size=size, symmetric=symmetric,
                           act_order=act_order, damping=damping, block=block, axis=axes[n],
                           scale_dtype=p.dtype, full_range=full_range)  # fmt: skip
            with torch.no_grad():
                p.copy_(r.weight)
            codes[layers[n]] = r.codes
            done.append(_record(n, layers[n], widths[n], size, r, H, rows[n]))
    setattr(out, ATTRIBUTE, Quantization(codes, symmetric, tuple(done), emb, peak))
    return out


def quantization_of(model: nn.Module) -> Quantization:
    """The integer codes a copy from :func:`gptq` carries (``model.hesse_quantization``).

    Raises:
        TypeError: the model was not made by :func:`gptq`.
    """
    info = getattr(model, ATTRIBUTE, None)
    if not isinstance(info, Quantization):
        raise TypeError(
            f"quant: {type(model).__name__} carries no integer codes (.{ATTRIBUTE}); only "
            "copies returned by hesse.quant.gptq do. For a plain fake-quantized model, use "
            "save_pretrained (dense float weights)."
        )
    return info


def _widths(model: nn.Module, bits: int | Mapping[str, int]) -> dict[str, int]:
    layers = quantizable(model)
    skip = set(tied(model, layers)) & _embedding_tied(model, layers)
    if isinstance(bits, Mapping):
        for name in bits:
            if name not in layers:
                raise ValueError(unknown(name, layers))
        widths = {n: int(b) for n, b in bits.items() if n not in skip}
    else:
        widths = {n: int(bits) for n in layers if n not in skip}
    for n, b in widths.items():
        if check_bits(b, f"gptq({n!r})") < 2:
            raise ValueError(f"gptq: bits must be >= 2, got {b} for {n!r}.")
    return widths


def _embedding_tied(model: nn.Module, layers: Mapping[str, str]) -> set[str]:
    """Layers whose weight is an ``nn.Embedding``'s weight."""
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    params = dict(model.named_parameters())
    return {n for n, p in layers.items() if id(params[p]) in ids}


def _embeddings(model: nn.Module, bits: int | None, symmetric: bool, codes: dict) -> tuple:
    """Round every embedding to nearest, one grid per row; their codes go into ``codes``."""
    if bits is None:
        return ()
    grid = Quantizer(check_bits(bits, "gptq(embeddings)"), "channel", symmetric=symmetric)
    names = {id(p): n for n, p in model.named_parameters()}
    done = []
    for module in model.modules():
        if isinstance(module, nn.Embedding) and id(module.weight) in names:
            W = module.weight
            c = grid.codes(W)
            s = torch.exp2(torch.ceil(torch.log2(c.scale)))  # a power of two (see the docstring)
            q = torch.round(W.detach().double() / s + c.zero).clamp(c.lo, c.hi)
            c = Codes(q, s, c.zero, c.bits, c.shape, c.lo, c.hi)
            with torch.no_grad():
                W.copy_(c.dequantize().to(W.dtype))
            codes[names[id(W)]] = c
            done.append(names[id(W)])
    return tuple(done)


def _record(name: str, param: str, bits: int, size, r: GptqLayerResult, H, n: int) -> GptqLayer:
    return GptqLayer(name, param, bits, size, r.error, r.rtn_error, r.rule,
                     r.relative_damping, float(H.diagonal().sum()), n)  # fmt: skip
