"""The objective: the mean loss of a model over every sample that a data source yields."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from .params import ParamSpace

Batch = Any
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, Any]]

_DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class _CallLossFn(nn.Module):
    """Lets ``functional_call`` swap parameters under a user ``loss_fn(model, batch)``."""

    def __init__(self, model: nn.Module, fn: LossFn):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch: Batch) -> tuple[torch.Tensor, Any]:
        return self.fn(self.model, batch)


class Objective:
    r"""The mean loss over all samples, as a function of the analysed parameters.

    .. math::
        L(\theta) = \frac{\sum_b w_b\, \ell_b(\theta)}{\sum_b w_b}

    where :math:`\ell_b` is the mean loss of batch :math:`b` and :math:`w_b` the number of
    samples (or tokens) that mean was over, so uneven batches are weighted exactly. Under
    ``torch.distributed`` both sums are all-reduced: each rank passes its own shard of the data
    and every rank gets the full-data value.

    Args:
        model: The network. It is not modified: parameters are cast copies (or views, when
            ``dtype`` and ``device`` already match).
        data: A ``DataLoader``, a list of batches, or one batch. A batch is ``(inputs, targets)``
            or a dict (``model(**batch)``, Hugging Face style), or anything ``loss_fn`` accepts.
        loss: ``loss(outputs, targets) -> mean loss`` (e.g. ``F.cross_entropy``). For dict batches
            without ``loss``, ``model(**batch).loss`` is used.
        loss_fn: Alternative to ``loss``: ``loss_fn(model, batch) -> (mean_loss, weight)``, where
            ``weight`` is what the mean was over (e.g. the number of non-padding tokens).
        params: Names of the parameters to analyse (default: all with ``requires_grad``).
        device: Where to compute (default: the model's).
        dtype: Floating dtype of parameters and inputs (default: the model's).
        allow_train_mode: Accept batch-norm layers in training mode (batch statistics).
        progress: Show a progress bar over batches on each data pass.

    Raises:
        ValueError: active dropout, batch-norm in training mode, empty data, a one-shot
            iterator as data, no trainable parameters, or a missing loss.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> data = [(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))]
        >>> obj = Objective(model, data, loss=nn.functional.cross_entropy)
        >>> obj.dim
        8
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        loss: Callable | None = None,
        *,
        loss_fn: LossFn | None = None,
        params: Sequence[str] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        allow_train_mode: bool = False,
        progress: bool = False,
    ):
        if loss is not None and loss_fn is not None:
            raise ValueError("Objective: pass either loss= or loss_fn=, not both.")
        _check_deterministic(model, allow_train_mode)
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        chosen = list(named) if params is None else list(params)
        unknown = [n for n in chosen if n not in named]
        if unknown:
            raise ValueError(
                f"Objective: unknown or frozen parameters {unknown}; "
                f"trainable parameters are: {', '.join(named)}."
            )
        if not chosen:
            raise ValueError(
                "Objective: the model has no trainable parameters (none with requires_grad); "
                "unfreeze some with p.requires_grad_(True) or name them with params=."
            )
        first = named[chosen[0]]
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype or first.dtype
        self.model, self.loss, self.loss_fn, self.progress = model, loss, loss_fn, progress
        self.params = {n: self._cast(named[n].detach()) for n in chosen}
        state = dict(model.named_parameters()) | dict(model.named_buffers())
        # train-mode batch-norm updates its running statistics in place: work on copies then
        own = allow_train_mode
        self.frozen = {
            n: self._cast(t.detach().clone() if own else t.detach())
            for n, t in state.items()
            if n not in self.params
        }
        self.space = ParamSpace.from_named(self.params)
        self._data = _as_batches(data, loss_fn is not None)
        self._caller = _CallLossFn(model, loss_fn) if loss_fn is not None else None
        self._check_first_batch()

    @property
    def dim(self) -> int:
        """Number of analysed parameters ``d``."""
        return self.space.dim

    # ------------------------------------------------------------------ data pass
    def batches(self) -> Iterator[Batch]:
        """Yield the batches, moved to ``device`` and cast to ``dtype``."""
        bar = tqdm(self._data, desc="data pass", leave=False, disable=not self.progress)
        for batch in bar:
            yield self._move(batch)

    def accumulate(
        self, fn: Callable[[int, Any], tuple[torch.Tensor, float]], items: Iterable | None = None
    ) -> torch.Tensor:
        """Weighted mean of per-batch sums: ``sum_b fn(b)[0] / sum_b fn(b)[1]``, over all ranks.

        Args:
            fn: ``fn(index, batch) -> (sum_term, weight)`` where ``sum_term`` is the batch's
                contribution already multiplied by its weight.
            items: What to pass to ``fn`` instead of the batches (e.g. cached per-batch state).

        Raises:
            ValueError: a batch produced non-finite values (the message names it).
        """
        total, weight, bad = None, 0.0, None
        for i, batch in enumerate(self.batches() if items is None else items):
            term, w = fn(i, batch)
            if bad is None and not torch.isfinite(term).all():
                bad = i  # raised after the reduction, so that no other rank waits forever
            total = term if total is None else total + term
            weight += float(w)
        if total is None:
            raise ValueError("Objective: the data yielded no batches on this process.")
        if dist.is_available() and dist.is_initialized():
            # the weight is reduced in float64: exact counts even for a float32 model
            buf = torch.cat(
                [
                    total.reshape(-1).double(),
                    total.new_tensor([weight, bad is not None], dtype=torch.float64),
                ]
            )
            dist.all_reduce(buf)
            total = buf[:-2].reshape(total.shape).to(total.dtype)
            weight, failed = float(buf[-2]), bool(buf[-1])
        else:
            failed = bad is not None
        if failed:
            where = f"batch {bad}" if bad is not None else "a batch of another process"
            raise ValueError(
                f"Objective: non-finite loss or derivative in {where}; check that batch's "
                "inputs and targets, and the numerical range of the loss."
            )
        return total / weight

    # ------------------------------------------------------------------ functions of theta
    def outputs(self, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """Model outputs (logits) on ``batch`` at ``params``; needs ``loss=`` batches."""
        if self._caller is not None:
            raise ValueError(
                "Objective: this curvature needs the model outputs apart from the loss, which a "
                "loss_fn= objective does not expose; build the Objective with loss= instead."
            )
        if isinstance(batch, Mapping):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            out = functional_call(self.model, (params, self.frozen), (), inputs)
        else:
            out = functional_call(self.model, (params, self.frozen), (batch[0],))
        if isinstance(out, torch.Tensor):
            return out
        if isinstance(out, Mapping):
            return out["logits"]
        return out[0] if isinstance(out, (tuple, list)) else out.logits

    def targets(self, batch: Batch) -> torch.Tensor:
        """The targets of a ``loss=`` batch."""
        return batch["labels"] if isinstance(batch, Mapping) else batch[1]

    def batch_weight(self, batch: Batch) -> float:
        """What a ``loss=`` batch's mean is over.

        Integer targets (classes, tokens) count the labels that are not -100, the
        ``ignore_index`` of ``cross_entropy``; floating targets count rows (samples).
        """
        y = self.targets(batch)
        if y.is_floating_point():
            return float(y.shape[0])
        return float((y != -100).sum())

    def output_loss(self, out: torch.Tensor, targets: torch.Tensor, weight: float) -> torch.Tensor:
        """Sum-form loss of outputs: ``weight * loss(out, targets)``."""
        return weight * self.loss(out, targets)

    def batch_loss(
        self, params: dict[str, torch.Tensor], batch: Batch
    ) -> tuple[torch.Tensor, float]:
        """``(w_b * mean_loss_b, w_b)`` for one batch at ``params`` (differentiable)."""
        if self._caller is not None:
            prefixed = {"model." + n: t for n, t in params.items()}
            frozen = {"model." + n: t for n, t in self.frozen.items()}
            mean, w = functional_call(self._caller, (prefixed, frozen), (batch,))
            return mean * w, float(w)
        if self.loss is None:
            out = functional_call(self.model, (params, self.frozen), (), dict(batch))
            w = self.batch_weight(batch)
            value = out["loss"] if isinstance(out, Mapping) else out.loss
            return value * w, w
        w = self.batch_weight(batch)
        return self.output_loss(self.outputs(params, batch), self.targets(batch), w), w

    def value(self) -> torch.Tensor:
        """The mean loss ``L(theta)`` over all data (0-d tensor)."""
        with torch.no_grad():
            return self.accumulate(lambda i, b: self.batch_loss(self.params, b))

    def gradient(self) -> torch.Tensor:
        """The gradient of the mean loss, flat ``(d,)``."""

        def term(i: int, batch: Batch) -> tuple[torch.Tensor, float]:
            params = {n: p.detach().requires_grad_(True) for n, p in self.params.items()}
            with torch.enable_grad():
                value, w = self.batch_loss(params, batch)
                g = torch.autograd.grad(
                    value, list(params.values()), allow_unused=True, materialize_grads=True
                )
            return torch.cat([t.reshape(-1) for t in g]), w

        return self.accumulate(term)

    def restrict(self, names: Sequence[str]) -> Objective:
        """The same objective as a function of a subset of the parameters (others fixed).

        Args:
            names: Parameter names or module prefixes.
        """
        chosen = self.space.select(names)
        sub = copy.copy(self)
        sub.params = {n: self.params[n] for n in chosen}
        sub.frozen = self.frozen | {n: t for n, t in self.params.items() if n not in sub.params}
        sub.space = self.space.subspace(chosen)
        return sub

    # ------------------------------------------------------------------ helpers
    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if t.is_floating_point() else t.dtype
        return t.to(device=self.device, dtype=dtype)

    def _move(self, batch: Batch) -> Batch:
        if isinstance(batch, torch.Tensor):
            return self._cast(batch)
        if isinstance(batch, Mapping):
            return {k: self._move(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._move(v) for v in batch)
        return batch

    def _check_first_batch(self) -> None:
        first = next(iter(self._data), None)
        if first is None:
            raise ValueError(
                "Objective: the data is empty (it yielded no batch); pass a DataLoader or a "
                "non-empty list of batches."
            )
        if self.loss_fn is None and self.loss is None and not isinstance(first, Mapping):
            raise ValueError(
                "Objective: no loss given for (inputs, targets) batches; pass loss= "
                "(e.g. torch.nn.functional.cross_entropy) or loss_fn=(model, batch) -> "
                "(mean_loss, weight)."
            )


_LOSS_FUNCTIONS = {
    nn.functional.cross_entropy: "cross_entropy",
    nn.functional.mse_loss: "mse",
    nn.functional.nll_loss: "nll",
}
_LOSS_MODULES = {nn.CrossEntropyLoss: "cross_entropy", nn.MSELoss: "mse", nn.NLLLoss: "nll"}


def loss_kind(loss: Callable | None) -> str | None:
    """Which of torch's losses ``loss`` is: ``"cross_entropy"``, ``"mse"``, ``"nll"``, or None."""
    for module, kind in _LOSS_MODULES.items():
        if isinstance(loss, module):
            return kind
    return _LOSS_FUNCTIONS.get(loss)


def _check_deterministic(model: nn.Module, allow_train_mode: bool) -> None:
    for name, m in model.named_modules():
        where = f"module {name!r}" if name else "the model"
        p = _dropout_rate(m)
        if m.training and p > 0:
            raise ValueError(
                f"Objective: {where} has active dropout (p={p}, training mode), which makes "
                "the loss random; call model.eval() first."
            )
        if isinstance(m, _BATCHNORM) and m.training and not allow_train_mode:
            raise ValueError(
                f"Objective: batch-norm {where} is in training mode (batch statistics, running "
                "averages updated on each pass); call model.eval(), or pass "
                "allow_train_mode=True to analyse the training-mode loss."
            )


def _dropout_rate(m: nn.Module) -> float:
    """The dropout probability a module applies in training mode (0 for other modules)."""
    if isinstance(m, _DROPOUT):
        return m.p
    if isinstance(m, nn.MultiheadAttention):
        return m.dropout  # functional dropout on the attention weights
    return 0.0


def _as_batches(data: Any, custom: bool) -> Iterable[Batch]:
    """A re-iterable collection of batches from a loader, a list of batches, or one batch."""
    single_pair = (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
        and not custom
    )
    if single_pair or isinstance(data, (Mapping, torch.Tensor)):
        return [data]
    if isinstance(data, Iterator):
        raise ValueError(
            "Objective: data is a one-shot iterator (e.g. a generator), but every analysis "
            "passes over the data many times; pass a list of batches or a DataLoader."
        )
    if not isinstance(data, Iterable):
        raise ValueError(
            f"Objective: data must be a DataLoader, a list of batches or one batch; "
            f"got {type(data).__name__}."
        )
    return data
