"""The objective: the mean loss of a model over every sample that a data source yields."""

from __future__ import annotations

import copy
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ._calls import Batch, CallLossFn, LossFn, cast, model_inputs, move
from ._gather import Gatherer
from ._hf_losses import infer_own_loss, task_outputs, task_targets, upcast
from ._losses import (
    LossSpec,
    ResolvedLoss,
    check_own_loss_batch,
    given_loss,
    logits_of,
    loss_kind,
    own_loss,
    target_weight,
)
from ._modes import check_repeatable, check_train_mode
from ._positions import as_batches, check_shards, positions, weighted_mean
from ._selection import Selection, aliases, choose, resolve
from ._shard import (
    Shard,
    infer_in_step,
    is_sharded,
    most_batches,
    padded,
    plain_module,
    sharded_mean,
    sharded_parts,
    zero_weight_loss,
)
from .params import ParamSpace

__all__ = ["Batch", "LossFn", "LossSpec", "Objective", "loss_kind"]


class Objective:
    r"""The mean loss over all samples, as a function of the analysed parameters.

    .. math::
        L(\theta) = \frac{\sum_b w_b\, \ell_b(\theta)}{\sum_b w_b}

    where :math:`\ell_b` is the mean loss of batch :math:`b` and :math:`w_b` what that mean
    was over (samples, counted tokens, or class weights: see :class:`LossSpec`), so uneven
    batches are weighted exactly; a batch with :math:`w_b = 0` (every label ignored) adds
    nothing. Under ``torch.distributed`` both sums are all-reduced: each rank passes its own
    shard of the data and every rank gets the full-data value.

    A model sharded with FSDP2 (``fully_shard``: its parameters are ``DTensor`` shards) is a
    function of each process's *local shards*: :attr:`space`, :attr:`dim` and every vector
    (gradients, operator products) are the local rows, :attr:`shard` maps them to the full
    layout (:attr:`full_space`), and the curvature operators' products are exact: the data
    pass runs a hook-free copy of the modules in which each FSDP unit gathers its parameters,
    differentiably, while it runs (``hesse.problem._gather``); gradients and products come out
    as local shards already summed over the processes (``accumulate(..., shards=True)``).

    A Hugging Face model that computes its own loss (dict batches with ``labels``, no ``loss=``)
    gets that loss inferred from its class and config: token cross-entropy for causal LMs
    (shifted: the logits at position ``t`` predict label ``t + 1``), masked LMs and token
    classifiers, cross-entropy or MSE (``problem_type="regression"``) for sequence classifiers.
    The inferred loss is checked against ``model(**batch).loss`` on the first batch that counts
    some labels and named in :attr:`loss_source`; :meth:`outputs` and :meth:`targets` then give
    logits and labels in the layout it reads (one row per token, shifted for causal LMs). Other
    models' own losses are used as they are (no GGN or Fisher then).

    Args:
        model: The network. It is not modified: parameters are cast copies (or views, when
            ``dtype`` and ``device`` already match).
        data: A ``DataLoader``, a list of batches, or one batch. A batch is ``(inputs, targets)``
            with ``inputs`` a tensor or a dict of keyword arguments, a dict (``model(**batch)``,
            Hugging Face style), or anything ``loss_fn`` accepts.
        loss: ``loss(outputs, targets) -> mean loss`` (e.g. ``F.cross_entropy``,
            ``nn.CrossEntropyLoss(weight=...)``, ``functools.partial(F.cross_entropy, ...)``).
            torch's cross-entropy, NLL and MSE are read with their settings (see
            :class:`LossSpec`); other callables must return a mean over the targets that are not
            -100. For dict batches without ``loss``, the model's own loss is used.
        loss_fn: Alternative to ``loss``: ``loss_fn(model, batch) -> (mean_loss, weight)``, where
            ``weight`` is what the mean was over (e.g. the number of non-padding tokens).
        params: What to analyse (default: all parameters with ``requires_grad``): parameter
            names, module prefixes, glob patterns (``"encoder.layer.5.*"``), ``Parameter`` or
            ``Module`` objects, or a list of them; kept in the model's order.
        device: Where to compute (default: the model's).
        dtype: Floating dtype of parameters and inputs (default: the model's).
        allow_train_mode: Accept batch-norm layers in training mode (batch statistics; their
            running averages are then updated on copies). Dropout is refused even then. A
            model in training mode without dropout or batch-norm modules is accepted when two
            evaluations of the first batch's loss under different random seeds agree (dropout
            applied without a module, as Hugging Face attention does, shows up there).
        progress: Show a progress bar over batches on each data pass.

    Attributes:
        shard: Under FSDP, this process's ``Shard`` of the parameters (None otherwise).
        full_space: The layout of the full parameters (:attr:`space` when not sharded).
        loss: The loss of the outputs as given, or the one inferred for a Hugging Face model
            (None for ``loss_fn=`` and unrecognised own losses).
        loss_spec: The recognised loss (:class:`LossSpec`), or None.
        loss_source: Where the loss comes from: ``"loss="``, ``"loss_fn="``,
            ``"model(**batch).loss"`` (a model's own loss, used as it is), or an inferred loss
            such as ``"inferred from GPT2LMHeadModel: token cross-entropy, shifted"``.

    Raises:
        ValueError: active dropout, a module in training mode, empty data (on any process),
            a one-shot iterator as data, a ``DistributedSampler`` that pads the data, no
            trainable or a complex parameter, a selection that matches nothing, a missing loss,
            dict batches without ``labels``, or a loss setting that is not a mean.

    Example:
        >>> model = nn.Linear(3, 2).eval()
        >>> data = [(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))]
        >>> obj = Objective(model, data, loss=nn.CrossEntropyLoss(label_smoothing=0.1))
        >>> obj.dim, obj.loss_spec.kind, obj.loss_spec.label_smoothing
        (8, 'cross_entropy', 0.1)
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        loss: Callable | None = None,
        *,
        loss_fn: LossFn | None = None,
        params: Selection | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        allow_train_mode: bool = False,
        progress: bool = False,
    ):
        if loss is not None and loss_fn is not None:
            raise ValueError("Objective: pass either loss= or loss_fn=, not both.")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"Objective: dtype must be a real floating dtype, got {dtype}.")
        suspects = check_train_mode(model, allow_train_mode)
        self.model, self.loss_fn, self.progress = model, loss_fn, progress
        # FSDP2: a copy of the modules without FSDP's hooks, each unit gathering its parameters
        # differentiably when it runs (hesse.problem._gather); the objective is a function of
        # the local shards
        sharded = is_sharded(model)
        self._module = plain_module(model) if sharded else model
        chosen, named = choose(model, params)
        first = named[chosen[0]]
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype or first.dtype
        self.shard: Shard | None = None
        self._gatherer: Gatherer | None = None
        if sharded:
            self.shard, self._gatherer, self.params, self.frozen = sharded_parts(
                model, self._module, chosen, self._cast, allow_train_mode
            )
            self.full_space = self.shard.full
        else:
            self.params = {n: self._cast(named[n].detach()) for n in chosen}
            state = dict(model.named_parameters()) | dict(model.named_buffers())
            # train-mode batch-norm updates its running statistics in place: work on copies
            self.frozen = {
                n: self._cast(t.detach().clone() if allow_train_mode else t.detach())
                for n, t in state.items()
                if n not in self.params
            }
            self.full_space = ParamSpace.from_named(self.params, aliases(model))
        self.space = self.full_space if self.shard is None else self.shard.space
        self._padding = False  # a zero-weight pass that keeps the processes in step (FSDP)
        self._data = as_batches(data, has_loss_fn=loss_fn is not None)
        self._caller = CallLossFn(self._module, loss_fn) if loss_fn is not None else None
        self._positions: list[torch.Tensor] | None = None
        first_batch = next(iter(self._data), None)
        self._shard_offset = check_shards(first_batch is None, self._data, self.device)
        self._most = None if self.shard is None else most_batches(self._data, self.device)
        self._resolved = self._resolve_loss(loss, first_batch)
        self.loss = loss if loss is not None else self._resolved.call
        if suspects:
            self._check_repeatable(first_batch, suspects)

    @property
    def loss_spec(self) -> LossSpec | None:
        """The recognised loss (:class:`LossSpec`), or None."""
        return self._resolved.spec

    @property
    def loss_source(self) -> str:
        """Where the loss comes from (see the class's Attributes)."""
        return self._resolved.source

    @property
    def task(self) -> str | None:
        """The Hugging Face task whose loss was inferred (e.g. ``"causal-lm"``), or None."""
        return self._resolved.task

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
        self,
        fn: Callable[[int, Any], tuple[torch.Tensor, float]],
        items: Iterable | None = None,
        *,
        shards: bool = False,
    ) -> torch.Tensor:
        """Weighted mean of per-batch sums: ``sum_b fn(b)[0] / sum_b fn(b)[1]``, over all ranks.

        Under FSDP every process runs as many passes as the process with the most batches:
        the others are padded with zero-weight passes over their first batch (``fn`` sees it
        with :meth:`batch_weight` 0), so that the collectives inside the passes (each unit's
        gathers, in the forward and the backward) run in the same order everywhere.

        Args:
            fn: ``fn(index, batch) -> (sum_term, weight)`` where ``sum_term`` is the batch's
                contribution already multiplied by its weight.
            items: What to pass to ``fn`` instead of the batches (e.g. cached per-batch state,
                padding included).
            shards: Under FSDP, the terms are derivatives with respect to the local shards
                (gradients, curvature products): already summed over the processes by the
                pass's reduce-scatters, so only the weights are all-reduced. Leave False for
                anything else (a loss value), which is all-reduced.

        Returns:
            ``sum_b term_b / sum_b w_b``, of the shape of ``fn``'s terms (a 0-d tensor for the
            loss, ``(d,)`` for the gradient, ``(d, k)`` for ``k`` products).

        Raises:
            ValueError: a batch produced non-finite values (the message names it), or the
                total weight is 0 (every label ignored).
        """
        if self.shard is None:
            return weighted_mean(
                fn(i, batch) for i, batch in enumerate(self.batches() if items is None else items)
            )
        terms = padded(self, fn, items)
        return sharded_mean(terms, self.device) if shards else weighted_mean(terms)

    def sample_positions(self, index: int) -> torch.Tensor:
        """Global positions of the samples of this process's batch number ``index``.

        A sample keeps its position whatever the batching and the number of processes, so
        draws keyed on it (the Monte-Carlo Fisher) are the same on every pass and on 1 or N
        processes. For a ``DataLoader`` the positions are the dataset indices that its batch
        sampler yields (the same on one process and on N processes with a non-shuffling
        ``DistributedSampler``; without one, a process's dataset follows those of lower ranks).
        For a list of batches they are running sample counts (along dim 0), the lists of the
        processes following each other in rank order. :meth:`outputs` rows are sample-major:
        for token losses, sample ``j``'s tokens are consecutive rows.

        Args:
            index: Batch number on this process, as passed to :meth:`accumulate`'s ``fn``.

        Returns:
            ``(n_b,)`` int64 tensor on the CPU.

        Raises:
            ValueError: the loader shuffles (its order changes between passes) or the sample
                count of a batch cannot be told; IndexError for an index past the data.

        Example:
            >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
            >>> obj = Objective(nn.Linear(3, 2).eval(), [(x[:3], y[:3]), (x[3:], y[3:])],
            ...                 loss=nn.functional.cross_entropy)
            >>> obj.sample_positions(1)
            tensor([3, 4])
        """
        if self._positions is None:
            self._positions = positions(self._data, self._shard_offset)
        if not 0 <= index < len(self._positions):
            raise IndexError(
                f"Objective.sample_positions: batch {index} does not exist; this process has "
                f"{len(self._positions)} batches."
            )
        return self._positions[index]

    # ------------------------------------------------------------------ functions of theta
    def outputs(self, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        r"""Model outputs (logits) on ``batch`` at ``params``, in the layout the loss reads.

        Dim 0 indexes the terms of the loss: curvature built from per-term gradients sums over
        its rows :math:`n`, such as the empirical Fisher
        :math:`\frac1W \sum_n J_n^\top r_n r_n^\top J_n` (:class:`~hesse.FisherOperator`),
        where :math:`r_n` is the gradient of the batch's :meth:`output_loss` with respect to
        row :math:`n` and :math:`J_n` the Jacobian of that row.

        - With ``loss=``, the model's outputs as they are (the tensor, ``["logits"]``,
          ``.logits`` or the first of a tuple): dim 0 holds the batch's samples, whatever the
          other dims hold (``(n_b, C, T)`` logits of a token loss make one term per sample).
        - With a loss inferred for a Hugging Face model, sequence classifiers give
          ``(n_b, C)`` (``(n_b, K)`` for regression) and token losses one row per token:
          ``(n_b T, C)`` for masked LMs and token classifiers, ``(n_b (T - 1), C)`` for causal
          LMs (the last position predicts no label). Rows are sample-major (sample ``j``'s
          tokens are consecutive), so each token whose label is kept is one term of the
          empirical Fisher; rows of ignored labels (-100) are there too, with :math:`r_n = 0`.

        Args:
            params: ``{name: tensor}`` of the analysed parameters (e.g. :attr:`params`).
            batch: A batch as :meth:`batches` yields it.

        Raises:
            ValueError: the objective was built with ``loss_fn=`` (no outputs apart from it).
        """
        if self._caller is not None:
            raise ValueError(
                "Objective: this curvature needs the model outputs apart from the loss, which a "
                "loss_fn= objective does not expose; build the Objective with loss= instead."
            )
        out = logits_of(self._forward(params, model_inputs(batch)))
        task = self.task
        return out if task is None else task_outputs(task, out)

    def targets(self, batch: Batch) -> torch.Tensor:
        """The targets of a batch, row for row with :meth:`outputs`.

        ``batch[1]`` of an ``(inputs, targets)`` batch and ``batch["labels"]`` of a dict batch,
        as they are; for a loss inferred for a Hugging Face model with token rows, the labels
        flattened to ``(n_b T,)``, or for a causal LM shifted and flattened to
        ``(n_b (T - 1),)``: output row ``(j, t)`` predicts label ``t + 1`` of sample ``j``.
        """
        y = batch["labels"] if isinstance(batch, Mapping) else batch[1]
        return y if self.task is None else task_targets(self.task, y)

    def batch_weight(self, batch: Batch) -> float:
        """What a batch's mean loss is over (:class:`LossSpec`); 0 when every label is ignored.

        For an unrecognised loss, integer targets count the labels that are not -100 and
        floating targets count rows (samples). 0 in a padding pass (FSDP, :meth:`accumulate`).
        """
        if self._padding:
            return 0.0
        return target_weight(self.targets(batch), self._resolved.spec, self._resolved.class_weights)

    def output_loss(self, out: torch.Tensor, targets: torch.Tensor, weight: float) -> torch.Tensor:
        """Sum-form loss of outputs: ``weight * loss(out, targets)`` (0 when ``weight`` is 0)."""
        if weight == 0:
            return out.sum() * 0.0  # the mean over no target is 0/0; the batch adds nothing
        if self.task is not None:
            out = upcast(out)
        call = self._resolved.call
        if call is None:
            raise ValueError(
                "Objective.output_loss: needs the loss as a function of the model outputs; build "
                "the Objective with loss= (e.g. torch.nn.functional.cross_entropy) instead of "
                "loss_fn= or a model that returns its own loss."
            )
        return weight * call(out, targets)

    def batch_loss(
        self, params: dict[str, torch.Tensor], batch: Batch
    ) -> tuple[torch.Tensor, float]:
        """The weighted loss of one batch at ``params``, differentiable with respect to them.

        Args:
            params: ``{name: tensor}`` of the analysed parameters (e.g. :attr:`params`).
            batch: A batch as :meth:`batches` yields it.

        Returns:
            ``(w_b * mean_loss_b, w_b)``: a 0-d tensor and the batch weight :math:`w_b`
            (:meth:`batch_weight`, or ``loss_fn``'s); a zero that depends on ``params`` when
            :math:`w_b = 0`.
        """
        if self._caller is not None:
            mean, w = self._call(self._caller, "model.", params, (batch,), {})
            if self._padding:  # the same graph as a real batch's: its collectives pair up
                return mean * 0.0, 0.0
            if float(w) == 0:
                return (
                    _zero(params) if self.shard is None else zero_weight_loss(self, params, batch)
                ), 0.0
            return mean * w, float(w)
        if self._padding:
            self._padding = False  # the batch's own weight, then none of it
            try:
                value, _ = self.batch_loss(params, batch)
            finally:
                self._padding = True
            return value * 0.0, 0.0
        w = self.batch_weight(batch)
        if w == 0:
            return (
                _zero(params) if self.shard is None else zero_weight_loss(self, params, batch)
            ), 0.0
        if self._resolved.call is None:
            return own_loss(self._forward(params, batch)) * w, w
        return self.output_loss(self.outputs(params, batch), self.targets(batch), w), w

    def value(self) -> torch.Tensor:
        r"""The mean loss over all data.

        Returns:
            :math:`L(\theta)`, a 0-d tensor of :attr:`dtype`.
        """
        with torch.no_grad():
            return self.accumulate(lambda i, b: self.batch_loss(self.params, b))

    def gradient(self) -> torch.Tensor:
        r"""The gradient of the mean loss.

        Returns:
            :math:`\nabla L(\theta)`, flat ``(d,)`` in the layout of :attr:`space`.
        """

        def term(i: int, batch: Batch) -> tuple[torch.Tensor, float]:
            params = {n: p.detach().requires_grad_(True) for n, p in self.params.items()}
            with torch.enable_grad():
                value, w = self.batch_loss(params, batch)
                g = torch.autograd.grad(
                    value, list(params.values()), allow_unused=True, materialize_grads=True
                )
            return torch.cat([t.reshape(-1) for t in g]), w

        return self.accumulate(term, shards=True)

    def restrict(self, names: Selection) -> Objective:
        """The same objective as a function of a subset of the parameters (others fixed).

        Args:
            names: What ``params=`` takes (names, module prefixes, glob patterns, ``Parameter``
                or ``Module`` objects), among the analysed parameters.
        """
        chosen = resolve(self.model, names, self.space, caller="Objective.restrict(names=)")
        sub = copy.copy(self)
        sub.params = {n: self.params[n] for n in chosen}
        sub.frozen = self.frozen | {n: t for n, t in self.params.items() if n not in sub.params}
        sub.shard = None if self.shard is None else self.shard.subset(chosen)
        sub.full_space = self.full_space.subspace(chosen)
        sub.space = sub.full_space if sub.shard is None else sub.shard.space
        return sub

    def with_data(self, data: Any) -> Objective:
        """The same objective (model, loss, parameters, dtype) over other data, e.g. one batch.

        Args:
            data: What the constructor's ``data`` takes.
        """
        sub = copy.copy(self)
        sub._data = as_batches(data, has_loss_fn=self.loss_fn is not None)
        sub._positions = None
        first = next(iter(sub._data), None)
        sub._shard_offset = check_shards(first is None, sub._data, self.device)
        sub._most = None if self.shard is None else most_batches(sub._data, self.device)
        return sub

    # ------------------------------------------------------------------ helpers
    def _forward(self, params: dict[str, torch.Tensor], inputs: Any) -> Any:
        if isinstance(inputs, Mapping):
            return self._call(self._module, "", params, (), dict(inputs))
        return self._call(self._module, "", params, (inputs,), {})

    def _call(self, module: nn.Module, prefix: str, params: dict, args: tuple, kwargs: dict):
        """``module(*args, **kwargs)`` at ``params``; under FSDP each unit gathers its own."""
        if self._gatherer is None:
            tensors = ({prefix + n: t for n, t in d.items()} for d in (params, self.frozen))
            return functional_call(module, tuple(tensors), args, kwargs)
        both, gathered = params | self.frozen, self._gatherer.layouts
        direct = {prefix + n: t for n, t in both.items() if n not in gathered}
        with self._gatherer.using({n: both[n] for n in gathered}):
            return functional_call(module, direct, args, kwargs)

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return cast(t, self.device, self.dtype)

    def _move(self, batch: Batch) -> Batch:
        return move(batch, self.device, self.dtype)

    def _check_repeatable(self, batch: Batch, suspects: list[str]) -> None:
        batch = self._move(batch)
        check_repeatable(lambda: self.batch_loss(self.params, batch)[0], suspects)

    def _resolve_loss(self, loss: Callable | None, first: Batch) -> ResolvedLoss:
        """Recognise ``loss``, or infer a Hugging Face model's own loss and confirm it on data.

        Raises:
            ValueError: dict batches without ``labels``, or a loss setting that is not a mean.
        """
        if self._caller is not None:
            return ResolvedLoss(None, None, "loss_fn=")
        if loss is not None:
            return given_loss(loss, first, self.dtype, self.device)
        check_own_loss_batch(first)
        return infer_in_step(self.shard, infer_own_loss, self._module, first, self)

    def _logits_and_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits of a dict batch without its labels, and the model's own loss with them."""
        with torch.no_grad():
            own = own_loss(self._forward(self.params, batch))
            return logits_of(self._forward(self.params, model_inputs(batch))), own


def _zero(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """A zero that depends on the parameters: its derivatives exist and are all zero."""
    total = typing.cast(torch.Tensor, sum(p.sum() for p in params.values()))  # params: never {}
    return total * 0.0
