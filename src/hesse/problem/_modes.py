"""Training-mode checks of an Objective: dropout refused, batch-norm only when allowed."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

_DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def check_train_mode(model: nn.Module, allow_train_mode: bool) -> list[str]:
    """Refuse dropout and (unless allowed) training-mode batch-norm; name the other suspects.

    Returns:
        Names of modules in training mode that may still act at random (any class outside
        the ``torch.nn`` layers that behave the same in both modes): the caller evaluates the
        loss twice to find out.
    """
    training = [(name, m) for name, m in model.named_modules() if m.training]
    for name, m in training:
        p = _dropout_rate(m)
        if p > 0:
            raise ValueError(
                f"Objective: {_where(name)} has active dropout (p={p}, training mode), which "
                "makes the loss random; call model.eval() first."
            )
    norms = [name for name, m in training if isinstance(m, _BATCHNORM)]
    if norms and not allow_train_mode:
        raise ValueError(
            f"Objective: batch-norm {_where(norms[0])} is in training mode (batch statistics, "
            "running averages updated on each pass); call model.eval(), or pass "
            "allow_train_mode=True to analyse the training-mode loss."
        )
    return [name for name, m in training if not type(m).__module__.startswith("torch.nn.")]


def check_repeatable(loss: Callable[[], torch.Tensor], suspects: list[str]) -> None:
    """Refuse a training-mode model whose loss differs between two random seeds.

    Any module may act differently in training mode: Hugging Face attention applies its
    dropout functionally (``F.dropout(p, training=self.training)``), with no module to find.

    Args:
        loss: Evaluates the loss of the first batch.
        suspects: Names of the modules in training mode (from :func:`check_train_mode`).
    """
    values = []
    for seed in (0, 1):
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(seed)
            values.append(loss())
    if not torch.allclose(values[0], values[1], rtol=1e-6, atol=0.0):
        n = len(suspects) - 1
        which = _where(suspects[0]) + (f" and {n} more" if n else "")
        raise ValueError(
            f"Objective: the model is in training mode ({which}) and its loss is random: "
            f"{float(values[0]):.6g} and {float(values[1]):.6g} on the first batch under two "
            "seeds (dropout applied without a dropout module, e.g. in attention); call "
            "model.eval() first."
        )


def _where(name: str) -> str:
    return f"module {name!r}" if name else "the model"


def _dropout_rate(m: nn.Module) -> float:
    """The dropout probability a module applies in training mode (0 for other modules)."""
    if isinstance(m, _DROPOUT):
        return m.p
    if isinstance(m, nn.MultiheadAttention):
        return m.dropout  # functional dropout on the attention weights
    return 0.0
