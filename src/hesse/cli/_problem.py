"""What a command works on: model, data and loss from a demo, factories or a Hugging Face folder."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import losses
from ..demo import load_demo
from ..problem import hf
from ..problem._shard import my_batches, shard_model
from . import _inputs as inputs
from ._inputs import UsageError


@dataclass(frozen=True)
class Problem:
    """What a command works on.

    Attributes:
        name: How the report names the model.
        model: The model, in eval mode.
        data: The (training) batches the curvature is of.
        loss: ``loss(outputs, targets)``, or None (``loss_fn`` or a Hugging Face model's own).
        loss_fn: ``loss_fn(model, batch) -> (mean_loss, weight)``, or None.
        lr: The training learning rate when known (demos), else None.
        n_classes: Number of classes when known, else None.
        description: One paragraph for the report, or None.
        training: How a demo was trained, or None.
        defaults: A demo's fast analysis settings (``samples``, ``k``, ...), else empty.
        test_data: Held-out batches (application commands: a demo's held-out fifth, or
            ``--test-data``), else None.
    """

    name: str
    model: torch.nn.Module
    data: object
    loss: Callable | None
    loss_fn: Callable | None
    lr: float | None
    n_classes: int | None
    description: str | None
    training: dict | None
    defaults: dict
    test_data: object = None


def from_demo(args: argparse.Namespace, progress: bool, holdout: float = 0.0) -> Problem:
    """A built-in demo (``--demo``), with ``holdout`` of its samples held out when > 0."""
    loss = args.loss or "cross_entropy"
    if loss not in inputs.LOSSES and loss.partition(":")[0] not in losses.NAMES:
        raise UsageError(
            f"--loss {loss!r} with --demo: the demos train with cross_entropy, mse or a "
            "hesse.losses name (gce:q=0.7, mae, zloss, ...); a custom loss needs --model and "
            "--data."
        )
    try:
        demo = load_demo(args.demo, loss=loss, holdout=holdout, progress=progress)
    except ValueError as err:
        raise UsageError(str(err)) from err
    samples = args.samples if args.samples is not None else demo.defaults.get("samples")
    data = demo.batches(samples=samples, batch_size=args.batch_size)
    test = demo.test_batches(batch_size=args.batch_size) if holdout else None
    return Problem(
        f"{demo.name} demo", demo.model, data, demo.loss, demo.loss_fn, demo.lr, demo.n_classes,
        demo.description, demo.training, demo.defaults, test,
    )  # fmt: skip


def from_factories(args: argparse.Namespace) -> Problem:
    """``--model`` and ``--data`` (and ``--test-data``) factories, with ``--loss``."""
    model = inputs.load_model(args.model, args.weights)
    data = inputs.load_data(args.data, args.samples, args.batch_size)
    test = inputs.load_data(args.test_data, None, args.batch_size) if args.test_data else None
    loss = inputs.load_loss(args.loss or "cross_entropy")
    return Problem(args.model, model, data, loss, None, None, None, None, None, {}, test)


def from_hf(args: argparse.Namespace) -> Problem:
    """A Hugging Face folder, with a text file (or a factory) as data; the model's own loss."""
    _quiet_transformers()
    try:
        model, tokenizer, task = hf.load_model(args.hf, args.hf_task)
        if args.weights:
            model.load_state_dict(inputs.load_weights(args.weights, model))
        data = _hf_data(args, args.data, model, tokenizer, task, args.samples)
        test = _hf_data(args, args.test_data, model, tokenizer, task) if args.test_data else None
    except (ValueError, OSError) as err:
        raise UsageError(_hf_words(str(err))) from err
    loss = inputs.load_loss(args.loss) if args.loss else None
    classes = model.config.num_labels if task == "sequence-classification" else None
    name = f"{type(model).__name__} ({args.hf})"
    return Problem(name, model, data, loss, None, None, classes, None, None, {}, test)


def _hf_data(args: argparse.Namespace, source: str, model, tokenizer, task, limit=None):
    """Batches from a text file (tokenized for ``task``) or from a factory."""
    if ":" in source and not os.path.isfile(source):
        return inputs.load_data(source, limit, args.batch_size)
    return hf.text_batches(
        source, tokenizer, task, text_column=args.text_column, label_column=args.label_column,
        label2id=model.config.label2id, max_length=args.max_length,
        batch_size=args.batch_size or 16, limit=limit, seed=args.seed,
    )  # fmt: skip


def _quiet_transformers() -> None:
    """Keep transformers' loading bars and notices off the command's stderr (one plan line)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


HF_WORDS = (
    ("task=", "--hf-task"),
    ("text_column=", "--text-column"),
    ("label_column=", "--label-column"),
    ("label2id=", "the config's labels"),
)
"""``hesse.hf`` parameter names and the command-line options they mean."""


def _hf_words(message: str) -> str:
    """A ``hesse.hf`` error in the words of the command line (``task='x'`` is ``--hf-task x``)."""
    message = re.sub(r"path=('[^']*')", r"\1", message)
    message = re.sub(r"task='([^']*)'", r"--hf-task \1", message)
    return cli_words(message, HF_WORDS)


def cli_words(message: str, words: tuple) -> str:
    """An API error message with its parameter names replaced by the command-line ``words``."""
    for api, option in words:
        message = message.replace(api, option)
    return message


def load(args: argparse.Namespace, progress: bool, holdout: float = 0.0) -> Problem:
    """The problem the command line names: a demo (with ``holdout``), an HF folder or factories."""
    if args.demo:
        problem = from_demo(args, progress, holdout=holdout)
    else:
        problem = from_hf(args) if args.hf else from_factories(args)
    return sharded(problem) if getattr(args, "shard", False) else problem


def sharded(problem: Problem) -> Problem:
    """``--shard``: the model sharded with FSDP2 and this process's share of the batches."""
    try:
        model = shard_model(problem.model)
        return dataclasses.replace(problem, model=model, data=my_batches(problem.data))
    except ValueError as err:
        raise UsageError(str(err)) from err


def use_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU threads: ``--threads``, else one for the demos, else torch's default.

    The demo models are tiny: intra-op threads only add spin-waits (5-10x slower products on a
    busy 2-core machine), so demos run on one thread unless ``--threads`` says otherwise.
    """
    threads = args.threads if args.threads is not None else (1 if args.demo else None)
    if threads is not None:
        torch.set_num_threads(threads)
