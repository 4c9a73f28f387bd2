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
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hesse import _atomic
from hesse._demos import digits, tiny_lm

DEMOS = {"digits": digits, "tiny-lm": tiny_lm}
"""The demo modules by name; each defines ``Config``, ``dataset``, ``build_model`` and ``train``."""

CACHE_VERSION = 1
"""Bump when a demo's training code changes, so that stale cached weights are not reused."""


@dataclass(frozen=True)
class Demo:
    """A trained demo model with its training data.

    Attributes:
        name: the demo's name (a key of ``DEMOS``).
        model: the trained model, in eval mode.
        inputs: all training inputs, stacked (first dimension = samples).
        targets: all training targets, stacked.
        test_inputs: the held-out inputs (``load_demo(..., holdout=)``; empty when none).
        test_targets: the held-out targets.
        loss: ``loss(outputs, targets)`` for tuple batches, or None when ``loss_fn`` is used.
        loss_fn: ``loss_fn(model, batch) -> (mean_loss, weight)``, or None.
        lr: the learning rate the model was trained with (plain SGD, no momentum).
        n_classes: number of classes (vocabulary size for the language model).
        description: one paragraph for the report.
        training: how training went: configuration, epochs or steps, final loss, cache file.
        batch_size: default batch size for the analysis data passes.
        defaults: analysis settings that keep this demo fast (``samples``, ``k``, ``budget``,
            ``steps``, ``probes``); the CLI uses them unless told otherwise.
    """

    name: str
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    test_inputs: torch.Tensor
    test_targets: torch.Tensor
    loss: Callable | None
    loss_fn: Callable | None
    lr: float
    n_classes: int
    description: str
    training: dict = field(default_factory=dict)
    batch_size: int = 256
    defaults: dict = field(default_factory=dict)

    def batches(self, *, samples: int | None = None, batch_size: int | None = None) -> list:
        """The first ``samples`` training samples as a list of ``(inputs, targets)`` batches.

        Args:
            samples: number of samples (all when None).
            batch_size: samples per batch (``self.batch_size`` when None).

        Returns:
            A list of ``(inputs, targets)`` tuples; the last one may be smaller.
        """
        n = len(self.inputs) if samples is None else min(samples, len(self.inputs))
        return _batches(self.inputs[:n], self.targets[:n], batch_size or self.batch_size)

    def test_batches(self, *, batch_size: int | None = None) -> list:
        """The held-out samples as a list of ``(inputs, targets)`` batches.

        Raises:
            ValueError: the demo was loaded without ``holdout``.
        """
        if not len(self.test_inputs):
            raise ValueError(
                f"Demo {self.name!r}: no held-out samples; load it with "
                f"load_demo({self.name!r}, holdout=0.2)."
            )
        return _batches(self.test_inputs, self.test_targets, batch_size or self.batch_size)


def _batches(inputs: torch.Tensor, targets: torch.Tensor, size: int) -> list:
    ends = [(i, min(i + size, len(inputs))) for i in range(0, len(inputs), size)]
    return [(inputs[a:b], targets[a:b]) for a, b in ends]


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
        loss: ``"cross_entropy"`` or ``"mse"`` (digits only: squared loss on one-hot targets).
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
        _atomic.torch_save(path, {"state_dict": model.state_dict(), "training": training})
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


def _config_hash(name: str, config: object) -> str:
    """A short hash of everything that determines the trained weights."""
    settings = dataclasses.asdict(config)
    if not settings["holdout"]:
        del settings["holdout"]  # weights trained on all samples keep their earlier cache key
    key = {"demo": name, "version": CACHE_VERSION, "torch": torch.__version__, **settings}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
