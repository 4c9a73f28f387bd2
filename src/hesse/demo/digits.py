"""The digits demo: a small CNN on scikit-learn's 8x8 handwritten digits, trained with SGD."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import losses as hesse_losses
from ._demo import Demo, split

N_CLASSES = 10


@dataclass(frozen=True)
class Config:
    """Training configuration of the digits CNN (hashed into the cache key).

    Training stops at the end of the first epoch whose full-data loss is at most
    ``target()``: the outlier structure of the Hessian is clearest at a moderate loss,
    before the model interpolates and the curvature collapses. ``loss`` is ``cross_entropy``,
    ``mse`` or a multi-class :mod:`hesse.losses` name (``gce:q=0.7``, ``mae``, ``zloss``...);
    training with the latter stops on the cross-entropy instead, so that every loss is
    compared at the same fit.
    """

    loss: str = "cross_entropy"
    seed: int = 0
    lr: float = 0.1
    batch_size: int = 32
    max_epochs: int = 60
    target_loss: float | None = None
    holdout: float = 0.0

    def target(self) -> float:
        """``target_loss``, or the loss's default: 0.1 for cross-entropy, 0.01 for MSE."""
        if self.target_loss is not None:
            return self.target_loss
        return {"mse": 0.01}.get(self.loss, 0.1)


def build_model(config: Config) -> nn.Module:
    """The CNN: two 3x3 conv layers with max-pooling, then a two-layer MLP head (3658 params)."""
    torch.manual_seed(config.seed)
    layers = {
        "conv1": nn.Conv2d(1, 8, 3, padding=1),
        "relu1": nn.ReLU(),
        "pool1": nn.MaxPool2d(2),
        "conv2": nn.Conv2d(8, 16, 3, padding=1),
        "relu2": nn.ReLU(),
        "pool2": nn.MaxPool2d(2),
        "flatten": nn.Flatten(),
        "fc1": nn.Linear(64, 32),
        "relu3": nn.ReLU(),
        "fc2": nn.Linear(32, N_CLASSES),
    }
    return nn.Sequential(OrderedDict(layers))


def dataset(config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``(N, 1, 8, 8)`` floats in [0, 1] and their targets.

    Targets are class indices for cross-entropy and one-hot rows for the squared loss.
    """
    from sklearn.datasets import load_digits  # 0.4 s to import: only when a demo is built

    X, y = load_digits(return_X_y=True)
    inputs = torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    labels = torch.tensor(y, dtype=torch.long)
    if config.loss == "mse":
        return inputs, F.one_hot(labels, N_CLASSES).float()
    return inputs, labels


def loss_function(config: Config):
    """``F.cross_entropy``, ``F.mse_loss`` or the :mod:`hesse.losses` loss ``config.loss`` names."""
    losses = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}
    if config.loss in losses:
        return losses[config.loss]
    try:
        loss = hesse_losses.parse(config.loss)
    except ValueError as err:
        raise ValueError(f"digits demo: {err}") from None
    if not isinstance(loss, (hesse_losses.CompSum, hesse_losses.ZLoss)):
        raise ValueError(
            f"digits demo: {config.loss} is not a loss of (n, 10) logits and class labels; "
            "the digits demo takes cross_entropy, mse, the comp-sum losses and zloss."
        )
    return loss


def _monitor(config: Config):
    """The loss whose full-data value stops training: the training loss for torch's losses."""
    return loss_function(config) if config.loss == "mse" else F.cross_entropy


def parts(config: Config) -> tuple[tuple, tuple]:
    """``(inputs, targets)`` of the training part and of the held-out part (``config.holdout``)."""
    inputs, targets = dataset(config)
    train, test = split(len(inputs), config.holdout, config.seed)
    return (inputs[train], targets[train]), (inputs[test], targets[test])


def train(model: nn.Module, config: Config, *, progress: bool = False) -> dict:
    """Train with plain mini-batch SGD (no momentum) until ``target_loss`` or ``max_epochs``."""
    (inputs, targets), _ = parts(config)
    loss, monitor = loss_function(config), _monitor(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    epochs = tqdm(range(config.max_epochs), desc="training digits CNN", disable=not progress)
    for epoch in epochs:
        done = epoch + 1
        for idx in torch.randperm(len(inputs), generator=generator).split(config.batch_size):
            optimizer.zero_grad()
            loss(model(inputs[idx]), targets[idx]).backward()
            optimizer.step()
        with torch.no_grad():
            full_loss = monitor(model(inputs), targets).item()
        epochs.set_postfix(loss=f"{full_loss:.3f}")
        if full_loss <= config.target():
            break
    return {"epochs": done, "final_loss": full_loss, "accuracy": _accuracy(model, config)}


def _accuracy(model: nn.Module, config: Config) -> float:
    inputs, _ = dataset(config)
    from sklearn.datasets import load_digits

    labels = torch.tensor(load_digits().target)
    train, _ = split(len(inputs), config.holdout, config.seed)
    inputs, labels = inputs[train], labels[train]
    with torch.no_grad():
        return (model(inputs).argmax(-1) == labels).float().mean().item()


def make_demo(model: nn.Module, config: Config, training: dict):
    """Package the trained model as a ``hesse.demo.Demo``."""
    (inputs, targets), (test_inputs, test_targets) = parts(config)
    held_out = f", holding out {len(test_inputs)} for testing," if len(test_inputs) else ""
    return Demo(
        name="digits",
        model=model,
        inputs=inputs,
        targets=targets,
        test_inputs=test_inputs,
        test_targets=test_targets,
        loss=loss_function(config),
        loss_fn=None,
        lr=config.lr,
        n_classes=N_CLASSES,
        description=(
            f"A {sum(p.numel() for p in model.parameters())}-parameter CNN trained with plain "
            f"SGD (lr {config.lr}, batch {config.batch_size}, {config.loss} loss) on "
            f"{len(inputs)} of scikit-learn's 1797 handwritten digits (8x8 pixels, {N_CLASSES} "
            f"classes){held_out} until "
            f"the training {'loss' if config.loss == 'mse' else 'cross-entropy'} reached "
            f"{config.target()} ({training['epochs']} epochs)."
        ),
        training={"config": {**vars(config)}, **training},
        # One batch per data pass: at 8x8 pixels and 3658 parameters the cost of a product is
        # mostly per-call overhead, which one batch instead of eight cuts.
        batch_size=len(inputs),
    )
