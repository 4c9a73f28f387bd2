"""Pruned checkpoints that load: Hugging Face folders, smaller on disk when units were removed.

What is written, by kind of pruning:

- **Unstructured and n:m** (zeros in the weights): a plain ``save_pretrained`` folder, dense
  safetensors with the zeros in place, which ``from_pretrained`` loads as is. The sparse
  formats of compressed-tensors (``sparse-bitmask``, ``sparse-24-bitmask``) would store the
  kept values and a bitmask, but compressed-tensors 0.20 (the version ``transformers`` 5
  loads through) has removed its sparse compressors: ``ModelCompressor`` writes an empty
  ``sparsity_config`` and refuses Sparse24 configs, so such a folder would not load. The
  zeros are counted in ``config.json`` (``hesse_sparsity``).
- **Structured** (heads or MLP neurons removed, :func:`hesse.prune.prune` with
  ``structure="heads" | "channels"``): the smaller tensors themselves, so the folder holds
  fewer parameters. A Hugging Face config has one head count and one intermediate size for
  all layers (``transformers`` 5 dropped ``pruned_heads``), so ``config.json`` also records
  each shrunk tensor's shape and each changed size attribute (``hesse_pruned``), and
  :func:`load` (one line) rebuilds the model at those sizes; ``from_pretrained`` refuses the
  folder with a size-mismatch error rather than loading it wrong.

Every file is written atomically (:mod:`hesse.report.atomic`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..report.atomic import write_bytes

KEY_PRUNED = "hesse_pruned"
KEY_SPARSITY = "hesse_sparsity"


@dataclass(frozen=True)
class SavedCheckpoint:
    """A folder written by :func:`save`, and what it holds.

    Attributes:
        path: The folder.
        format: ``"dense"`` (zeros stored in place; ``from_pretrained`` loads it) or
            ``"shrunk"`` (smaller tensors; :func:`load` loads it).
        files: ``{file name: bytes}`` of every file written.
        total_bytes: Sum of ``files`` (tokenizer files included when saved).
        weight_bytes: Bytes of the ``.safetensors`` files.
        params_on_disk: Numbers stored in the safetensors files (tied weights once).
        zeros: Of those, how many are exactly zero.
    """

    path: Path
    format: str
    files: dict[str, int]
    total_bytes: int
    weight_bytes: int
    params_on_disk: int
    zeros: int


def save(model: nn.Module, folder: str | os.PathLike, *, tokenizer: Any = None) -> SavedCheckpoint:
    """Save a pruned Hugging Face model so that it loads (see the module docstring for formats).

    Args:
        model: A ``transformers`` ``PreTrainedModel`` as :meth:`PrunePlan.apply` returns it.
        folder: Destination folder (created; files already there are replaced one by one).
        tokenizer: Saved alongside when given, so the folder works with ``--hf``.

    Returns:
        :class:`SavedCheckpoint` with the bytes of every file.

    Raises:
        TypeError: ``model`` is not a ``transformers`` ``PreTrainedModel``;
            save a plain module with ``torch.save(model)``.

    Example:
        >>> import transformers, tempfile
        >>> cfg = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
        ...                               num_attention_heads=2, intermediate_size=12)
        >>> m = transformers.BertModel(cfg)
        >>> with torch.no_grad():
        ...     _ = m.encoder.layer[0].intermediate.dense.weight.zero_()
        >>> saved = save(m, tempfile.mkdtemp())
        >>> saved.format, saved.zeros >= 96
        ('dense', True)
    """
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(
            f"prune.save: {type(model).__name__} is not a Hugging Face model (it has no "
            "save_pretrained); save it with torch.save(model) instead."
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shrunk = _shrunk(model)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        params, zeros = _count(tmp)
        _annotate(tmp / "config.json", shrunk, params, zeros)
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
        for name in files:
            write_bytes(folder / name, (tmp / name).read_bytes())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    weights = sum(n for f, n in files.items() if f.endswith(".safetensors"))
    kind = "shrunk" if shrunk["shapes"] else "dense"
    return SavedCheckpoint(folder, kind, files, sum(files.values()), weights, params, zeros)


def load(folder: str | os.PathLike, *, model_class: Any = None) -> nn.Module:
    """Load a folder written by :func:`save`: shrunk models at their own per-layer sizes.

    Args:
        folder: The folder.
        model_class: The ``transformers`` class to build (default: the config's
            ``architectures[0]``).

    Returns:
        The model in eval mode; a folder without removed units comes from ``from_pretrained``.

    Raises:
        ValueError: the checkpoint does not fit the model rebuilt from its config.
    """
    import transformers
    from safetensors.torch import load_file

    folder = Path(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    cls = model_class or getattr(transformers, config.architectures[0])
    info = getattr(config, KEY_PRUNED, None)
    if not info or not info.get("shapes"):
        return cls.from_pretrained(folder).eval()
    model = cls(config)
    _reshape(model, info)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state |= load_file(file)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    loaded = {t.data_ptr() for t in state.values()} | {
        p.data_ptr() for n, p in model.state_dict().items() if n in state
    }
    untied = [n for n in missing if model.state_dict()[n].data_ptr() not in loaded]
    if unexpected or untied:
        raise ValueError(
            f"prune.load: {folder} does not fit {cls.__name__} rebuilt from its config "
            f"(unexpected {unexpected[:3]}, missing {untied[:3]}); was it written by "
            "hesse.prune.save?"
        )
    return model.eval()


def _shrunk(model: nn.Module) -> dict[str, dict]:
    """Tensors smaller than the config says, and the int attributes that changed with them."""
    with torch.device("meta"):
        fresh = type(model)(model.config)
    full = {n: t.shape for n, t in fresh.state_dict().items()}
    shapes = {
        n: list(t.shape) for n, t in model.state_dict().items() if n in full and t.shape != full[n]
    }
    attrs: dict[str, dict[str, int]] = {}
    fresh_modules = dict(fresh.named_modules())
    for name, module in model.named_modules():
        before = vars(fresh_modules[name]) if name in fresh_modules else {}
        changed = {
            k: v
            for k, v in vars(module).items()
            if type(v) is int and k in before and before[k] != v
        }
        if changed:
            attrs[name] = changed
    return {"shapes": shapes, "attributes": attrs}


def _reshape(model: nn.Module, info: dict[str, Any]) -> None:
    """Give ``model`` the recorded tensor shapes (values follow) and size attributes."""
    for name, shape in info["shapes"].items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        old = getattr(module, attr)
        new = torch.empty(shape, dtype=old.dtype)
        setattr(module, attr, nn.Parameter(new, old.requires_grad) if old.requires_grad else new)
    for name, attrs in info["attributes"].items():
        module = model.get_submodule(name)
        for key, value in attrs.items():
            setattr(module, key, value)


def _count(folder: Path) -> tuple[int, int]:
    """``(numbers, zeros)`` stored in the folder's safetensors files."""
    from safetensors.torch import load_file

    params = zeros = 0
    for file in folder.glob("*.safetensors"):
        for t in load_file(file).values():
            params, zeros = params + t.numel(), zeros + int((t == 0).sum())
    return params, zeros


def _annotate(config: Path, shrunk: dict[str, dict], params: int, zeros: int) -> None:
    data = json.loads(config.read_text())
    if shrunk["shapes"]:
        data[KEY_PRUNED] = shrunk
    kind = "shrunk" if shrunk["shapes"] else "dense-with-zeros"
    data[KEY_SPARSITY] = {"format": kind, "params_on_disk": params, "zeros": zeros}
    config.write_text(json.dumps(data, indent=2, sort_keys=True))
