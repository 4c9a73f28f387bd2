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

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

LOSSES = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}


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
    model = call_factory(spec, "--model", (nn.Module,), "a torch.nn.Module")
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


def load_data(spec: str, samples: int | None, batch_size: int) -> DataLoader:
    """A loader over the first ``samples`` samples of the data factory's result."""
    label = "a torch Dataset, a DataLoader, or a tuple (inputs, targets) of tensors"
    data = call_factory(spec, "--data", (Dataset, DataLoader, tuple, list), label)
    collate = None
    if isinstance(data, DataLoader):
        data, collate = data.dataset, data.collate_fn
    elif isinstance(data, (tuple, list)):
        if len(data) != 2 or not all(isinstance(t, torch.Tensor) for t in data):
            raise UsageError(
                f"--data {spec!r} returned a {type(data).__name__}; expected {label}. Return "
                f"exactly two tensors (inputs, targets), not {len(data)} items of other types."
            )
        data = TensorDataset(*data)
    if samples is not None:
        data = Subset(data, range(min(samples, len(data))))
    return DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate)


def load_loss(name: str) -> Callable:
    """``cross_entropy``, ``mse`` or a ``pkg.mod:fn`` taking ``(outputs, targets)``."""
    if name in LOSSES:
        return LOSSES[name]
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
