"""What the ``hesse`` command loads: factories named ``pkg.mod:name``, weights, data, outputs.

Every failure raises :class:`UsageError` with one paragraph that says what was expected,
what arrived and how to fix it; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from hesse import losses
from hesse.operators._memory import size_bytes
from hesse.problem._positions import is_batch, sample_count

LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
}


class UsageError(Exception):
    """A problem with what the user asked for (exit status 2), not with the computation."""


def load_object(spec: str, option: str) -> object:
    """Import ``name`` from ``package.module`` given ``"package.module:name"``.

    The current directory is searched first, as ``python -m`` does, so that a model defined
    in ``./mymodels.py`` is found as ``mymodels:make``.
    """
    module_name, colon, attr = spec.partition(":")
    if not (colon and module_name and attr):
        raise UsageError(
            f"{option} {spec!r}: expected 'package.module:name', e.g. 'mymodels:make_model' "
            "for a function make_model in mymodels.py."
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise UsageError(
            f"{option} {spec!r}: module {module_name!r} not found ({err}). Check the spelling, "
            "run hesse from the folder that holds it, or install its package."
        ) from err
    names = vars(module)
    if attr not in names:
        public = ", ".join(sorted(n for n in names if not n.startswith("_"))[:20])
        raise UsageError(
            f"{option} {spec!r}: module {module_name!r} has no {attr!r}; it defines: {public}."
        )
    return names[attr]


def call_factory(spec: str, option: str, expected: tuple[type, ...], label: str) -> object:
    """Load the factory ``spec``, call it without arguments and check the result's type."""
    factory = load_object(spec, option)
    if not callable(factory):
        raise UsageError(
            f"{option} {spec!r}: expected a function, found a {type(factory).__name__}."
        )
    result = factory()
    if not isinstance(result, expected):
        raise UsageError(
            f"{option} {spec!r} returned a {type(result).__name__}; expected {label}. Make the "
            f"factory return {label}."
        )
    return result


def load_model(spec: str, weights: str | None) -> nn.Module:
    """The model from its factory, with ``weights`` loaded when given, in eval mode."""
    # call_factory checked that the factory returned an nn.Module
    model = cast(nn.Module, call_factory(spec, "--model", (nn.Module,), "a torch.nn.Module"))
    if weights is not None:
        model.load_state_dict(load_weights(weights, model))
    return model.eval()


def load_weights(path: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict read with ``torch.load(weights_only=True)`` and checked against ``model``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise UsageError(f"--weights {path}: no such file.") from err
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        raise UsageError(
            f"--weights {path}: torch.load(weights_only=True) refused it ({first}). The file "
            "holds pickled Python objects, not only tensors, and loading it could run code. "
            "Save plain weights with torch.save(model.state_dict(), FILE); if you trust the "
            "file, convert it once with torch.load(FILE, weights_only=False)."
        ) from err
    if not isinstance(state, Mapping):
        raise UsageError(
            f"--weights {path}: holds a {type(state).__name__}; expected a state dict "
            "({name: tensor}) as written by torch.save(model.state_dict(), FILE)."
        )
    _check_keys(path, state, model.state_dict())
    return dict(state)


def _check_keys(path: str, state: Mapping, expected: Mapping) -> None:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        problems = [
            f"{label}: {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}"
            for label, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches (file vs model)", shapes),
            )
            if keys
        ]
        raise UsageError(
            f"--weights {path}: the weights do not fit the model; " + "; ".join(problems) + ". "
            "Check that --model builds the architecture these weights were saved from."
        )


DATA_KINDS = (
    "a DataLoader, a Dataset, a list of batches, or one batch (an (inputs, targets) tuple or "
    "a dict of tensors)"
)
"""What ``--data`` factories may return: what ``hesse.Objective`` takes."""


def load_data(spec: str, samples: int | None, batch_size: int | None) -> object:
    """The data of the factory ``spec``, cut to ``samples`` samples, in batches of ``batch_size``.

    A ``Dataset`` (or a ``DataLoader``'s dataset) is batched in its order, ``batch_size`` or
    the loader's batch size or 256 samples per batch. A list of batches keeps its batches,
    split when they exceed ``batch_size``; one batch is split into batches of ``batch_size``
    (default 256). Batches are ``(inputs, targets)`` tuples (inputs a tensor or a dict) or
    dicts of tensors (Hugging Face style).

    Returns:
        A ``DataLoader`` or a list of batches, as ``hesse.Objective`` takes them.
    """
    kinds = (Dataset, DataLoader, tuple, list, Mapping)
    # call_factory checked that the factory returned one of kinds
    data = cast(
        Dataset | DataLoader | tuple | list | Mapping,
        call_factory(spec, "--data", kinds, DATA_KINDS),
    )
    if isinstance(data, DataLoader):
        return _loader(spec, data.dataset, samples, batch_size or data.batch_size, data)
    if isinstance(data, Dataset):
        return _loader(spec, data, samples, batch_size, None)
    if is_batch(data):
        return split_batches([data], samples, batch_size or 256)
    for i, batch in enumerate(data):
        if not is_batch(batch):
            raise UsageError(
                f"--data {spec!r} returned a {type(data).__name__} whose item {i} "
                f"({_kind(batch)}) is not a batch; expected {DATA_KINDS}."
            )
    if not data:
        raise UsageError(f"--data {spec!r} returned an empty {type(data).__name__}; expected "
                         f"{DATA_KINDS}.")  # fmt: skip
    return split_batches(list(data), samples, batch_size)


def _loader(spec, dataset, samples, batch_size, loader: DataLoader | None):
    """A loader over the first ``samples`` samples of ``dataset``, in order (never shuffled)."""
    if isinstance(dataset, IterableDataset):
        if samples is not None or batch_size is not None:
            raise UsageError(
                f"--data {spec!r}: --samples and --batch-size need a map-style dataset (with "
                "len and indexing); this one is an IterableDataset. Cut and batch it in the "
                "factory, or return a list of batches."
            )
        return loader if loader is not None else DataLoader(dataset, batch_size=None)
    if samples is not None:
        dataset = Subset(dataset, range(min(samples, len(dataset))))
    collate = loader.collate_fn if loader is not None else None
    return DataLoader(dataset, batch_size=batch_size or 256, shuffle=False, collate_fn=collate)


def split_batches(batches: list, samples: int | None, batch_size: int | None) -> list:
    """The first ``samples`` samples of ``batches``, no batch longer than ``batch_size``.

    Example:
        >>> x = torch.arange(10.0)
        >>> [len(b[0]) for b in split_batches([(x, x)], samples=7, batch_size=3)]
        [3, 3, 1]
    """
    out, left = [], samples
    for batch in batches:
        n = sample_count(batch) or 0
        if left is not None:
            if left <= 0:
                break
            batch, n = (slice_batch(batch, 0, left), min(n, left)) if n > left else (batch, n)
            left -= n
        size = batch_size or n
        out += [slice_batch(batch, a, a + size) for a in range(0, n, size)] if n > size else [batch]
    return out


def slice_batch(batch, start: int, stop: int):
    """Samples ``start:stop`` of a batch (tensors sliced on their first dimension)."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() else batch
    if isinstance(batch, Mapping):
        return {key: slice_batch(value, start, stop) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(slice_batch(item, start, stop) for item in batch)
    return batch


def _kind(obj: object) -> str:
    if isinstance(obj, (tuple, list)):
        inner = ", ".join(type(item).__name__ for item in obj[:3])
        return f"{type(obj).__name__} of {len(obj)} ({inner}{', ...' if len(obj) > 3 else ''})"
    return type(obj).__name__


def load_loss(name: str) -> Callable:
    """``cross_entropy``, ``mse``, a :mod:`hesse.losses` name or a ``pkg.mod:fn``.

    A :mod:`hesse.losses` name carries its parameters after a colon, comma-separated:
    ``gce:q=0.7``, ``mae``, ``sum_exp``, ``comp_sum:tau=0.5``, ``zloss:a=2,b=1``,
    ``anyloss:metric=f_beta,beta=1,L=73``, ``adv_comp_sum:tau=1,nu=1`` (see
    ``hesse.losses.parse``); a dotted name before a colon is a ``pkg.mod:fn``.
    """
    if name in LOSSES:
        return LOSSES[name]
    if name.partition(":")[0] in losses.NAMES:
        try:
            return losses.parse(name)
        except ValueError as err:
            raise UsageError(f"--loss {err}") from None
    loss = load_object(name, "--loss")
    if not callable(loss):
        raise UsageError(
            f"--loss {name!r}: expected a function loss(outputs, targets), found a "
            f"{type(loss).__name__}; name a function, or use cross_entropy or mse."
        )
    return loss


def writable_folder(path: str) -> Path:
    """Create the output folder and check that a file can be written in it."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UsageError(
            f"--out {path}: cannot write there ({err.strerror or err}); choose a folder you "
            "can write to, e.g. --out ./hesse-report."
        ) from err
    return folder


def parse_params(text: str | None) -> list[str] | None:
    """``--params 'a.*,b'`` as ``["a.*", "b"]`` (None when the option is absent)."""
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UsageError(
            f"--params {text!r}: no names; give parameter names, module prefixes or glob "
            "patterns separated by commas, e.g. --params 'encoder.layer.5.*,classifier'."
        )
    return names


def parse_groups(text: str | None) -> dict[str, list[str]] | None:
    """``--groups 'attn=*.attention.*;head=classifier,pooler'`` as ``{name: [patterns]}``.

    Example:
        >>> parse_groups("attn=*.attention.*;head=classifier,pooler")
        {'attn': ['*.attention.*'], 'head': ['classifier', 'pooler']}
    """
    if text is None:
        return None
    groups = {}
    for part in filter(str.strip, text.split(";")):
        name, _, patterns = part.partition("=")
        names = parse_params(patterns) if patterns.strip() else None
        if not name.strip() or names is None:
            raise UsageError(
                f"--groups {text!r}: expected NAME=PATTERNS entries separated by ';', e.g. "
                "--groups 'attn=*.attention.*;head=classifier'."
            )
        groups[name.strip()] = names
    return groups or None


def parse_size(text: str, option: str = "--max-memory") -> int:
    """Bytes from ``"8G"``, ``"500MB"``, ``"1.5GiB"`` or ``"1024"`` (see ``size_bytes``).

    Example:
        >>> parse_size("8G"), parse_size("500mb"), parse_size("1.5GiB"), parse_size("100")
        (8000000000, 500000000, 1610612736, 100)
    """
    try:
        return size_bytes(text, option)
    except ValueError:
        raise UsageError(
            f"{option} {text!r}: expected a positive size such as 8G, 500M or 1.5GiB "
            "(K, M, G, T: powers of 1000; Ki, Mi, Gi, Ti: powers of 1024)."
        ) from None
