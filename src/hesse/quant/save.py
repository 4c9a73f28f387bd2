r"""A quantized copy as a Hugging Face folder in compressed-tensors' ``pack-quantized`` format.

The format ``transformers`` loads through the ``compressed-tensors`` package and vLLM serves:
each quantized ``nn.Linear`` ``m`` is stored as ``m.weight_packed`` (int32, codes packed along
the inputs, :mod:`hesse.quant._pack`), ``m.weight_scale`` (one scale per group, in the
weight's dtype) and ``m.weight_shape``; ``config.json`` gains a ``quantization_config`` with
one config group per (bits, strategy, group size), so per-layer widths are kept. Groups run
along the original column order (no ``g_idx``: compressed-tensors 0.20 stores none), which is
why :func:`hesse.quant.gptq` keeps them so under ``act_order``.

Written dense (the fake-quantized values, in bfloat16 where that is exact, as the power-of-two
steps of :func:`hesse.quant.gptq`'s embeddings make it; else in the model's dtype), and listed
in ``SavedCheckpoint.dense``: quantized embeddings, because transformers 5.25 cannot load a packed
``nn.Embedding`` (its weight initialization reads ``Embedding.weight``, which the compressed
module lacks: ``AttributeError`` in ``from_pretrained``); layers of other module types
(GPT-2's ``Conv1D``, convolutions), which compressed-tensors does not pack; widths above 8.
Asymmetric grids are refused: their packed zero points do not reload in that stack.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..report import atomic
from ._pack import pack_int32
from .gptq import Quantization, quantization_of
from .quantizer import Codes

_FORMAT = "pack-quantized"


@dataclass(frozen=True)
class SavedCheckpoint:
    r"""What :func:`save` wrote.

    Attributes:
        path: The folder.
        folder_bytes: Bytes of every file in the folder (config and tokenizer included).
        weight_bytes: Bytes of the ``.safetensors`` files.
        packed_bytes: Bytes of the packed codes and their scales as stored: about
            :math:`\sum_i n_i b_i / 8` plus the scales.
        float_bytes: Bytes of the tensors kept in floating point (biases, norms, layers not
            quantized) as stored.
        dense: Quantized weights written dense (fake-quantized values; see the module
            docstring: embeddings, non-``Linear`` layers, widths above 8).
    """

    path: Path
    folder_bytes: int
    weight_bytes: int
    packed_bytes: int
    float_bytes: int
    dense: tuple[str, ...]


def save(qmodel: nn.Module, path: str | os.PathLike, *, tokenizer=None) -> SavedCheckpoint:
    """Save a copy from :func:`hesse.quant.gptq` so that ``from_pretrained`` loads it.

    The folder is written next to ``path`` under a temporary name and renamed into place, so a
    reader never sees a half-written checkpoint; an existing folder at ``path`` is replaced.

    Args:
        qmodel: A Hugging Face ``PreTrainedModel`` returned by :func:`hesse.quant.gptq`.
        path: The folder to write.
        tokenizer: Saved into the folder too when given.

    Returns:
        :class:`SavedCheckpoint` with the folder's byte counts.

    Raises:
        TypeError: ``qmodel`` has no ``save_pretrained`` or no integer codes (it was not made
            by :func:`hesse.quant.gptq`).
        ValueError: asymmetric grids (their zero points do not reload, see above).
    """
    quant = quantization_of(qmodel)
    if not hasattr(qmodel, "save_pretrained"):
        raise TypeError(
            f"quant.save: {type(qmodel).__name__} is not a Hugging Face model (no "
            "save_pretrained); save its state_dict, or quantize a PreTrainedModel."
        )
    if not quant.symmetric:
        raise ValueError(
            "quant.save: asymmetric grids do not reload: transformers 5.25 with "
            "compressed-tensors 0.20 allocates unpacked zero points and re-initializes the "
            "packed ones it reads (size mismatch). Quantize with symmetric=True."
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        stats = _write(qmodel, quant, tmp, tokenizer)
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = [f for f in path.rglob("*") if f.is_file()]
    weights = sum(f.stat().st_size for f in files if f.suffix == ".safetensors")
    return SavedCheckpoint(path, sum(f.stat().st_size for f in files), weights, *stats)


def _write(qmodel: nn.Module, quant: Quantization, folder: Path, tokenizer) -> tuple:
    from safetensors.torch import load_file, save_file

    qmodel.save_pretrained(folder)  # type: ignore[operator]
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    modules = dict(qmodel.named_modules())
    packable, dense = _packable(quant.codes, modules)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
        f.unlink()
    packed = 0
    for param, codes in packable.items():
        module = param.rpartition(".")[0]
        tensors.pop(param, None)
        dtype = modules[module].weight.dtype
        for key, t in _compress(codes, dtype).items():
            tensors[f"{module}.{key}"] = t
            packed += t.numel() * t.element_size() if key != "weight_shape" else 0
    for param in dense:
        d = tensors.get(param)
        if d is not None and d.is_floating_point() and torch.equal(d.bfloat16().to(d.dtype), d):
            tensors[param] = d.bfloat16()  # exact (gptq's embedding levels are), half the bytes
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _index_removed(folder)
    _config(folder, packable, quant, modules)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    shapes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.endswith("_shape"))
    return packed, total - packed - shapes, tuple(dense)


def _packable(codes: Mapping[str, Codes], modules: Mapping[str, nn.Module]):
    packable, dense = {}, []
    for param, c in codes.items():
        module = modules.get(param.rpartition(".")[0])
        ok = isinstance(module, nn.Linear) and param.endswith(".weight")
        if ok and c.bits <= 8 and c.axis == 0:
            packable[param] = c
        else:
            dense.append(param)
    return packable, dense


def _compress(codes: Codes, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``weight_packed``, ``weight_scale`` and ``weight_shape`` of a symmetric grid."""
    rows = codes.shape[0]
    q = codes.q.reshape(rows, -1).round().to(torch.int64)
    out = {
        "weight_packed": pack_int32(q, codes.bits),
        "weight_scale": codes.scale.reshape(rows, -1).to(dtype).contiguous(),
        "weight_shape": torch.tensor(list(codes.shape), dtype=torch.int64),
    }
    return out


def _scheme(codes: Codes, symmetric: bool) -> dict:
    groups = codes.q.shape[0] // codes.shape[0]
    size = codes.q.shape[1]
    strategy = "channel" if groups == 1 else "group"
    return {
        "num_bits": codes.bits,
        "type": "int",
        "symmetric": symmetric,
        "strategy": strategy,
        "group_size": size if strategy == "group" else None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
    }


def _config(folder: Path, packable: Mapping[str, Codes], quant: Quantization, modules) -> None:
    groups: dict[str, dict] = {}
    for param, c in packable.items():
        scheme = _scheme(c, quant.symmetric)
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, {"targets": [], "weights": scheme})
        groups[key]["targets"].append(param.rpartition(".")[0])
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "format": _FORMAT,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "ignore": [],
        "kv_cache_scheme": None,
    }
    atomic.write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")


def _index_removed(folder: Path) -> None:
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)


def _replace(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``, replacing an existing folder."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
