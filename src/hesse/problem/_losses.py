"""Losses of the model outputs that hesse recognises: torch's losses and their settings."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..losses import CompSum, OutputLoss, SquaredError, nll_curvature

IGNORE_INDEX = -100  # torch's and transformers' default label for "not counted"

_LOSS_FUNCTIONS: dict[Callable[..., torch.Tensor], str] = {
    F.cross_entropy: "cross_entropy",
    F.mse_loss: "mse",
    F.nll_loss: "nll",
}
LOSS_BY_KIND = {kind: fn for fn, kind in _LOSS_FUNCTIONS.items()}
_LOSS_MODULES = {nn.CrossEntropyLoss: "cross_entropy", nn.MSELoss: "mse", nn.NLLLoss: "nll"}
# torch's losses declare their output curvature through the hesse.losses that they equal
# (label smoothing and class weights keep cross-entropy convex); autograd forms their products
_CURVATURE: dict[str, OutputLoss] = {
    "cross_entropy": CompSum(1.0),
    "mse": SquaredError(),
    "nll": nll_curvature,
}
_SETTINGS = {
    "cross_entropy": ("weight", "ignore_index", "reduction", "label_smoothing"),
    "nll": ("weight", "ignore_index", "reduction"),
    "mse": ("reduction",),
}


@dataclass(frozen=True)
class LossSpec:
    r"""A loss of the model outputs that hesse recognises, and the settings that change it.

    Only mean-reduced losses are accepted. With per-class weights :math:`c` (``weight=``, else
    :math:`c \equiv 1`) and the targets :math:`y_i \ne` ``ignore_index`` of a batch, torch's
    mean and hence the batch weight are

    .. math::
        \ell_b = \frac{\sum_i c_{y_i} \ell_i}{\sum_i c_{y_i}}, \qquad w_b = \sum_i c_{y_i},

    so :math:`\sum_b w_b \ell_b / \sum_b w_b` is the loss of all data in one batch. Label
    smoothing changes :math:`\ell_i`, not :math:`w_b`. Class probabilities as targets count
    ``numel / C`` (samples times positions); ``mse`` counts rows.

    Attributes:
        kind: ``"cross_entropy"``, ``"mse"`` or ``"nll"``.
        ignore_index: Target value left out of the loss and of the weight (None for ``mse``).
        class_weighted: Per-class weights are set. The loss is then no negative
            log-likelihood, so there is no predictive distribution to sample a "true" Fisher from.
        label_smoothing: Cross-entropy smoothing (again no likelihood to sample from when > 0).
        curvature: What the loss declares about its Hessian in the outputs (convexity, a zero
            Hessian, the predicted outliers): a :class:`hesse.losses.OutputLoss`.
        closed_form: The loss is a :mod:`hesse.losses` loss whose output-Hessian products
            (``curvature.hessian_product``) replace autograd's in the GGN.
    """

    kind: str
    ignore_index: int | None = None
    class_weighted: bool = False
    label_smoothing: float = 0.0
    curvature: OutputLoss | None = None
    closed_form: bool = False

    def __post_init__(self):
        if self.curvature is None and self.kind in _CURVATURE:
            object.__setattr__(self, "curvature", _CURVATURE[self.kind])


@dataclass(frozen=True)
class ResolvedLoss:
    """How an :class:`~hesse.Objective` computes its loss, as resolved when it is built.

    Attributes:
        call: ``call(outputs, targets) -> mean loss`` as computed (a recognised loss with its
            settings bound and class weights cast, a loss inferred for a Hugging Face model, or
            an unrecognised ``loss=`` as given); None when the model's own loss or
            ``loss_fn=`` is used.
        spec: The recognised loss, or None.
        source: Where the loss comes from (``Objective.loss_source``).
        task: The Hugging Face task whose layout ``Objective.outputs`` and ``Objective.targets``
            follow, or None (outputs and targets as they are).
        class_weights: The per-class weights of a recognised loss, cast, or None.
    """

    call: Callable | None
    spec: LossSpec | None
    source: str
    task: str | None = None
    class_weights: torch.Tensor | None = None


def loss_kind(loss: Callable | None) -> str | None:
    """Which recognised loss ``loss`` is: torch's, a :mod:`hesse.losses` one, or None.

    Torch's are ``"cross_entropy"``, ``"mse"`` and ``"nll"``; a :class:`hesse.losses.OutputLoss`
    is known by its ``spec``, its name with its parameters (``"gce:q=0.7"``). Of torch's,
    instances of the exact module classes, the functions of ``torch.nn.functional`` and
    ``functools.partial`` of those functions are recognised; their settings are read by
    :class:`~hesse.Objective` (``objective.loss_spec``). A subclass may compute another loss in
    its ``forward`` (a focal loss derived from ``nn.CrossEntropyLoss``), so it is not
    recognised: it is used as given, like any other callable.

    Example:
        >>> class Focal(nn.CrossEntropyLoss):
        ...     def forward(self, x, y):
        ...         ce = F.cross_entropy(x, y, reduction="none")
        ...         return ((1 - torch.exp(-ce)) ** 2 * ce).mean()
        >>> loss_kind(nn.MSELoss()), loss_kind(functools.partial(F.nll_loss)), loss_kind(Focal())
        ('mse', 'nll', None)
    """
    if isinstance(loss, OutputLoss):
        return loss.spec
    if isinstance(loss, functools.partial):
        loss = loss.func
    elif isinstance(loss, nn.Module):
        return _LOSS_MODULES.get(type(loss))
    # by identity: an arbitrary callable need not be hashable
    return next((kind for fn, kind in _LOSS_FUNCTIONS.items() if fn is loss), None)


def given_loss(
    loss: Callable, first: Any, dtype: torch.dtype, device: torch.device
) -> ResolvedLoss:
    """The loss passed as ``loss=``: recognised with its settings (class weights cast), or as is.

    Args:
        loss: ``loss(outputs, targets) -> mean loss``.
        first: The first batch (a dict batch must hold the targets as ``labels``).
        dtype: The objective's floating dtype (for class weights).
        device: The objective's device (for class weights).

    Returns:
        The resolved loss; ``spec`` is None for an unrecognised loss.

    Raises:
        ValueError: dict batches without ``labels``, a partial that binds what hesse does not
            read, or a reduction that is not the mean.
    """
    if isinstance(first, Mapping) and "labels" not in first:
        raise ValueError(
            "Objective: with loss= the targets of a dict batch are batch['labels'], but the "
            f"first batch has the keys {sorted(first)}. Name the targets 'labels', pass "
            "(inputs, targets) batches (inputs may be a dict), or pass loss_fn=."
        )
    if isinstance(loss, OutputLoss):
        return _output_loss(loss)
    kind = loss_kind(loss)
    if kind is None:
        return ResolvedLoss(loss, None, "loss=")
    settings = _settings(loss, kind)
    reduction = settings.pop("reduction", "mean")
    if reduction != "mean":
        raise ValueError(
            f"Objective: the {kind} loss has reduction={reduction!r}, but the objective is a "
            "mean over all samples, built from batch means weighted exactly; pass the loss with "
            "reduction='mean' (the default). The sum over N samples is N times that mean, with "
            "N times its curvature."
        )
    if settings.get("weight") is not None:
        settings["weight"] = settings["weight"].to(device=device, dtype=dtype)
    spec = LossSpec(
        kind,
        ignore_index=None if kind == "mse" else settings.get("ignore_index", IGNORE_INDEX),
        class_weighted=settings.get("weight") is not None,
        label_smoothing=float(settings.get("label_smoothing", 0.0)),
    )
    call = functools.partial(LOSS_BY_KIND[kind], **settings)
    return ResolvedLoss(call, spec, "loss=", class_weights=settings.get("weight"))


def _output_loss(loss: OutputLoss) -> ResolvedLoss:
    """A :mod:`hesse.losses` loss: its own closed-form curvature, or torch's cross-entropy.

    Raises:
        ValueError: a loss drawn anew at every call (EnsLoss), which is no fixed function.
    """
    if loss.stochastic:
        raise ValueError(
            f"Objective: loss={loss.spec} draws a new random loss at every call, so the "
            "objective would change between evaluations and its curvature products would be "
            "noise (its per-step output Hessian is 0 anyway: the loss is linear in the outputs). "
            "Train with it, then analyse the trained model with a fixed calibrated loss, e.g. "
            "loss=torch.nn.functional.binary_cross_entropy_with_logits."
        )
    if isinstance(loss, CompSum) and loss.tau == 1:  # exactly torch's cross-entropy
        return ResolvedLoss(F.cross_entropy, LossSpec("cross_entropy", IGNORE_INDEX), "loss=")
    spec = LossSpec(loss.spec, curvature=loss, closed_form=True)
    return ResolvedLoss(loss, spec, "loss=")


def _settings(loss: Callable, kind: str) -> dict[str, Any]:
    """The settings a loss module or partial holds, among those that hesse reads."""
    if isinstance(loss, nn.Module):
        return {k: getattr(loss, k) for k in _SETTINGS[kind]}
    if not isinstance(loss, functools.partial):
        return {}
    extra = set(loss.keywords) - set(_SETTINGS[kind])
    if loss.args or extra:
        raise ValueError(
            f"Objective: loss=functools.partial({loss.func.__name__}, ...) binds "
            f"{'positional arguments' if loss.args else sorted(extra)}; hesse reads only the "
            f"keywords {', '.join(_SETTINGS[kind])}. Bind only those, or pass loss_fn=."
        )
    return dict(loss.keywords)


def target_weight(
    y: torch.Tensor, spec: LossSpec | None, class_weights: torch.Tensor | None = None
) -> float:
    """What a batch's mean loss is over (:class:`LossSpec`); 0 when every label is ignored.

    For an unrecognised loss (``spec`` None), integer targets count the labels that are not
    -100 and floating targets count rows (samples).

    Raises:
        ValueError: integer targets for an mse loss (it has no ``ignore_index``).

    Example:
        >>> target_weight(torch.tensor([2, -100, 0]), LossSpec("cross_entropy", -100))
        2.0
    """
    if spec is not None and spec.closed_form:  # hesse.losses: a mean over rows
        return float(y.shape[0])
    if y.is_floating_point():
        if spec is not None and spec.kind == "cross_entropy":  # class probabilities
            return float(y.numel() // y.shape[min(1, y.dim() - 1)])
        return float(y.shape[0]) if y.dim() else 1.0
    ignore = IGNORE_INDEX if spec is None else spec.ignore_index
    if ignore is None:
        raise ValueError(
            f"Objective: the mse loss got integer targets ({y.dtype}), which it does not count "
            "by an ignore_index; pass floating targets (y.float())."
        )
    counted = y != ignore
    if class_weights is not None:
        return float(class_weights[y[counted]].sum())
    return float(counted.sum())


def check_own_loss_batch(batch: Any) -> None:
    """Refuse a first batch whose model cannot compute its own loss (no ``loss=`` given).

    Raises:
        ValueError: ``batch`` is not a dict, or has no ``labels``.
    """
    if not isinstance(batch, Mapping):
        raise ValueError(
            "Objective: no loss given for (inputs, targets) batches; pass loss= "
            "(e.g. torch.nn.functional.cross_entropy) or loss_fn=(model, batch) -> "
            "(mean_loss, weight)."
        )
    if "labels" not in batch:
        raise ValueError(
            f"Objective: a dict batch without loss= needs 'labels' (the model then computes "
            f"its own loss); got the keys {sorted(batch)}. Add the labels, or pass loss= "
            "with (inputs, targets) batches."
        )


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model output: the tensor, ``["logits"]``, first of a tuple, ``.logits``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        return out["logits"]
    return out[0] if isinstance(out, (tuple, list)) else out.logits


def own_loss(out: Any) -> torch.Tensor:
    """The loss a model returned: ``.loss``, ``["loss"]``, or first of a tuple."""
    if isinstance(out, Mapping):
        loss = out.get("loss")
    elif isinstance(out, (tuple, list)):
        loss = out[0]
    else:
        loss = getattr(out, "loss", None)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(
            f"Objective: the model returned no scalar loss for a dict batch with 'labels' (got "
            f"{type(out).__name__}); pass loss= (a function of the outputs) or loss_fn=."
        )
    return loss
