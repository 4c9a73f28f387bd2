"""Built-in demos: a small trained model, its training data and its loss, ready to analyse.

Two demos ship with hesse, both offline and fast on a laptop CPU:

- ``"digits"``: a small CNN trained with plain SGD on scikit-learn's bundled handwritten
  digits (1797 images of 8x8 pixels, 10 classes). The classic setting for the outlier
  structure of the Hessian (Sagun et al. 2017; Papyan 2019).
- ``"tiny-lm"``: a two-layer character-level transformer language model trained on the
  dataset descriptions that ship inside scikit-learn; its loss is the mean over tokens,
  weighted by the number of tokens of each batch.

Trained weights are cached in ``$HESSE_CACHE_DIR``, else ``$XDG_CACHE_HOME/hesse``, else
``~/.cache/hesse``, keyed by a hash of the training configuration, so a second run only
loads them.

Example:
    >>> demo = load_demo("digits")  # doctest: +SKIP
    >>> report = hesse.analyze(  # doctest: +SKIP
    ...     demo.model, demo.batches(), loss=demo.loss, lr=demo.lr, n_classes=demo.n_classes
    ... )
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..report import atomic
from . import digits, tiny_lm
from ._demo import Demo

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["DEMOS", "Demo", "cache_dir", "load_demo"]

DEMOS = {"digits": digits, "tiny-lm": tiny_lm}
"""The demo modules by name; each defines ``Config``, ``dataset``, ``build_model`` and ``train``."""

CACHE_VERSION = 1
"""Bump when a demo's training code changes, so that stale cached weights are not reused."""


def cache_dir() -> Path:
    """The folder for cached demo weights (``$HESSE_CACHE_DIR`` overrides the default)."""
    if os.environ.get("HESSE_CACHE_DIR"):
        return Path(os.environ["HESSE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hesse"


def load_demo(
    name: str,
    *,
    loss: str = "cross_entropy",
    seed: int = 0,
    holdout: float = 0.0,
    progress: bool = False,
) -> Demo:
    """Train a demo model, or load it from the cache when this configuration was trained before.

    Args:
        name: ``"digits"`` or ``"tiny-lm"``.
        loss: ``"cross_entropy"`` or ``"mse"`` (digits only: squared loss on one-hot targets);
            the digits demo also takes multi-class :mod:`hesse.losses` names (``"gce:q=0.7"``).
        seed: seed of the initialisation, of the batch order and of the held-out split.
        holdout: fraction of the samples kept out of training (a seeded random split), for
            measuring test loss and accuracy; their model is trained (and cached) on the rest.
        progress: show a tqdm bar while training.

    Returns:
        The trained ``Demo``.

    Raises:
        ValueError: unknown demo name, a loss the demo does not support, or a holdout outside
            [0, 1).
    """
    if name not in DEMOS:
        raise ValueError(
            f"load_demo: unknown demo {name!r}; expected one of {', '.join(DEMOS)}. "
            "List them with `hesse analyze --help`."
        )
    module = DEMOS[name]
    if not 0 <= holdout < 1:
        raise ValueError(f"load_demo: holdout must be in [0, 1), got {holdout}.")
    config = module.Config(loss=loss, seed=seed, holdout=holdout)
    path = cache_dir() / f"{name}-{_config_hash(name, config)}.pt"
    model = module.build_model(config)
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["state_dict"])
        training = saved["training"]
    else:
        with _one_thread():
            training = module.train(model, config, progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.torch_save(path, {"state_dict": model.state_dict(), "training": training})
    return module.make_demo(model.eval(), config, {**training, "cache_file": str(path)})


@contextmanager
def _one_thread():
    """Run the block on one CPU thread, then restore the thread count.

    The demo models are so small that intra-op threads only add synchronisation: on a busy
    2-core machine, two threads made training 10x slower than one.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _config_hash(name: str, config: DataclassInstance) -> str:
    """A short hash of everything that determines the trained weights."""
    settings = dataclasses.asdict(config)
    if not settings["holdout"]:
        del settings["holdout"]  # weights trained on all samples keep their earlier cache key
    key = {"demo": name, "version": CACHE_VERSION, "torch": torch.__version__, **settings}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
