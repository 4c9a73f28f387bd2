r"""One batch of a Kronecker-factor pass: module inputs and outputs, and the vectors backpropagated.

The loss's sum-form Hessian with respect to the outputs of a batch is factorised as
:math:`H = \sum_c s_c s_c^\top` (``kind="exact"``); ``"mc"`` backpropagates gradients of
sampled targets, ``"empirical"`` the gradient of the true ones. Each vector goes back to the
outputs of every factored module in one backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch.func import grad, vjp

from ..problem._positions import sample_count
from ..problem.objective import Batch, Objective
from ._autograd import leaf_params
from ._draws import TargetSampler
from ._kfac_layers import Use

KINDS = ("exact", "mc", "empirical")


@dataclass
class Call:
    """One call of a factored module on a batch.

    Attributes:
        x: Its input, detached (token ids for an embedding).
        z: Its output, in the graph of the model's outputs.
        version: ``z``'s version counter when it was made (an in-place change moves it).
    """

    x: torch.Tensor
    z: torch.Tensor
    version: int


class Recorder:
    """Forward hooks that keep the inputs and outputs of the factored modules on one batch.

    An output whose dim 0 is 1 on a batch of ``n > 1`` samples is broadcast over the batch by
    the model (GPT-2 embeds its positions once for every sequence); it is expanded to ``n``
    rows, a view, so that its gradient is per sample.
    """

    def __init__(self, uses: list[Use], n: int):
        self.uses, self.n = uses, n
        self.calls: list[list[Call]] = [[] for _ in uses]
        self._handles: list = []

    def __enter__(self) -> Recorder:
        for i, use in enumerate(self.uses):
            hook = partial(self._hook, i)
            self._handles.append(use.layer.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, i: int, module, args, kwargs, out: torch.Tensor) -> torch.Tensor:
        x = args[0] if args else next(iter(kwargs.values()))
        if out.dim() and out.shape[0] == 1 and self.n > 1:
            out, x = out.expand(self.n, *out.shape[1:]), x.expand(self.n, *x.shape[1:])
        self.calls[i].append(Call(x.detach(), out, out._version))
        return out

    def check_unmodified(self, who: str) -> None:
        """Refuse outputs changed in place after they were made (their gradient is another's).

        Raises:
            ValueError: naming the module.
        """
        for use, calls in zip(self.uses, self.calls, strict=True):
            if any(c.z._version != c.version for c in calls):
                raise ValueError(
                    f"{who}: the output of module {use.module!r} is modified in place after it "
                    "is computed (e.g. by nn.ReLU(inplace=True)), so the gradient with respect "
                    "to it is not that of the module's output; use inplace=False there."
                )


class BatchPass:
    """The forward pass of one batch with its factored modules recorded.

    Attributes:
        params: The parameters as leaves (their gradients check the coverage).
        f: The model's outputs (``Objective.outputs``).
        y: The targets; ``w`` the batch weight; ``n`` the number of samples.
        calls: Per use, its calls on this batch.
    """

    def __init__(self, objective: Objective, uses: list[Use], batch: Batch, who: str):
        self.params = leaf_params(objective)
        self.n = sample_count(batch) or 1
        with torch.enable_grad(), Recorder(uses, self.n) as rec:
            self.f = objective.outputs(self.params, batch)
        rec.check_unmodified(who)
        self.calls = rec.calls
        self.y, self.w = objective.targets(batch), objective.batch_weight(batch)

    def gradients(self, s: torch.Tensor, with_params: bool = False):
        """Gradients of ``<s, f>`` w.r.t. every call's output (None where unused), and params.

        Returns:
            ``(per use: a list of gradients per call, {name: gradient} or None)``.
        """
        calls = self.calls
        live = [(i, j) for i, cs in enumerate(calls) for j, c in enumerate(cs) if c.z.requires_grad]
        names = list(self.params) if with_params else []
        inputs = [calls[i][j].z for i, j in live] + [self.params[n] for n in names]
        found = torch.autograd.grad(self.f, inputs, s, retain_graph=True, allow_unused=True)
        out: list[list] = [[None] * len(cs) for cs in calls]
        for (i, j), g in zip(live, found[: len(live)], strict=True):
            out[i][j] = g
        params = dict(zip(names, found[len(live) :], strict=True)) if with_params else None
        return out, params


class Vectors:
    r"""The vectors a batch backpropagates, whose outer products sum to the curvature.

    ``"exact"``: a factorisation :math:`H = \sum_c s_c s_c^\top` of the Hessian of the batch's
    sum-form loss with respect to each row of the outputs (:func:`hessian_columns`: one
    backward per class for a cross-entropy, per output entry of a row for MSE, and per row of
    a sample). For a cross-entropy with classes along dim 1, :math:`\mathrm{diag}(p) - pp^\top
    = \sum_c p_c (e_c - p)(e_c - p)^\top`, times the row's weight (class weight, label
    smoothing, 0 for an ignored label), which is read off the loss's own Hessian with one
    product. ``"mc"``: gradients at ``mc_samples`` targets drawn per row (``TargetSampler``,
    keyed by sample position), over :math:`\sqrt{\text{mc\_samples}}`. ``"empirical"``: the
    gradient at the true targets.

    Raises:
        ValueError: a loss the kind cannot factorise or sample from.
    """

    def __init__(self, objective: Objective, kind: str, seed: int, mc_samples: int, who: str):
        spec = objective.loss_spec
        self.loss_kind = spec.kind if spec is not None else ""
        _check_loss(objective, kind, self.loss_kind, who)
        self.objective, self.kind = objective, kind
        self.sampler = None
        if kind == "mc":
            self.sampler = TargetSampler(objective, self.loss_kind, seed=seed, count=mc_samples)

    def __call__(self, index: int, bp: BatchPass) -> Iterator[torch.Tensor]:
        f, y, w = bp.f.detach(), bp.y, bp.w
        if w == 0:
            return  # every label ignored: the batch adds nothing to the curvature
        if self.kind == "exact":
            yield from hessian_columns(self.objective, self.loss_kind, f, y, w, bp.n)
            return
        targets = [y] if self.sampler is None else self.sampler(index, y, f, w)
        for target in targets:
            r = grad(lambda out, t=target: self.objective.output_loss(out, t, w))(f)
            yield r / math.sqrt(len(targets))


def _check_loss(objective: Objective, kind: str, loss_kind: str, who: str) -> None:
    if objective.loss is None:
        raise ValueError(
            f"{who}: needs the loss as a function of the model outputs; build the Objective "
            "with loss= (e.g. torch.nn.functional.cross_entropy) instead of loss_fn= or a model "
            "that returns its own loss."
        )
    if kind == "empirical":
        return
    spec = objective.loss_spec
    if loss_kind not in ("cross_entropy", "mse"):
        raise ValueError(
            f"{who}(kind={kind!r}): factorises the output Hessian of cross_entropy and mse_loss "
            f"only; got {objective.loss!r}"
            + (" (nll_loss is linear in its inputs: its GGN is 0)" if loss_kind == "nll" else "")
            + ". Use kind='empirical', or a loss hesse recognises."
        )
    if kind == "mc" and spec is not None and (spec.class_weighted or spec.label_smoothing):
        raise ValueError(
            f"{who}(kind='mc'): a cross-entropy with class weights or label smoothing is not the "
            "negative log-likelihood of the model's predictive distribution, so sampled targets "
            "do not give its curvature; use kind='exact' (exact for this loss) or 'empirical'."
        )


def hessian_columns(
    objective: Objective, loss_kind: str, f: torch.Tensor, y: torch.Tensor, w: float, n: int
) -> Iterator[torch.Tensor]:
    """Vectors ``s`` (shaped like ``f``) whose ``sum s s^T`` is the output Hessian, row by row.

    Row ``k`` of every one of the ``n`` samples goes back together (samples do not interact),
    the rows of one sample in separate vectors, so that no terms between them appear; all-zero
    vectors (ignored rows) are skipped.

    Raises:
        ValueError: the rows of ``f`` are not a whole number per sample.
    """

    def loss(out: torch.Tensor) -> torch.Tensor:
        return objective.output_loss(out, y, w)

    hvp = vjp(grad(loss), f)[1]
    rows = f.shape[0]
    if rows % n:
        raise ValueError(
            f"the outputs have {rows} rows for {n} samples; their Hessian is factorised per "
            "row, sample-major (a whole number of rows per sample)."
        )
    count, column = _mse_columns(hvp, f) if loss_kind == "mse" else _ce_columns(hvp, f)
    for k in range(rows // n):
        keep = torch.zeros(rows, dtype=f.dtype, device=f.device)
        keep[k :: rows // n] = 1
        for j in range(count):
            s = column(j) * keep.reshape(-1, *[1] * (f.dim() - 1))
            if s.any():
                yield s


def _mse_columns(hvp, f: torch.Tensor):
    """``(E, column)``: the mean-reduced MSE scaled by ``w`` has the Hessian ``(2w/numel) I``."""
    sigma = hvp(torch.ones_like(f))[0].clamp_min(0).sqrt().reshape(f.shape[0], -1)

    def column(j: int) -> torch.Tensor:
        s = torch.zeros_like(sigma)
        s[:, j] = sigma[:, j]
        return s.reshape(f.shape)

    return sigma.shape[1], column


def _ce_columns(hvp, f: torch.Tensor):
    r"""``(C P, column)``: the cross-entropy's Hessian, one term per class and row position.

    :math:`\kappa(\mathrm{diag}(p) - pp^\top) = \sum_c \kappa p_c (e_c - p)(e_c - p)^\top` at
    each of the ``P`` positions of a row (classes along dim 1).
    """
    p = torch.softmax(f.double(), 1).reshape(f.shape[0], f.shape[1], -1)
    root = (_row_scale(hvp, p, f) * p).sqrt()
    classes = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)

    def column(j: int) -> torch.Tensor:
        pos, c = divmod(j, p.shape[1])
        s = torch.zeros_like(p)
        s[:, :, pos] = root[:, c, pos, None] * (classes[c] - p[:, :, pos])
        return s.reshape(f.shape).to(f.dtype)

    return p.shape[1] * p.shape[2], column


def _row_scale(hvp, p: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    r"""Each row's factor :math:`\kappa` in its Hessian :math:`\kappa(\mathrm{diag}(p) - pp^\top)`.

    Read at the class :math:`k` of largest :math:`p_k(1 - p_k)`, where the Hessian's diagonal
    :math:`\kappa p_k (1 - p_k)` is most accurate; 0 where it vanishes (an ignored label).
    """
    spread = p * (1 - p)
    k = spread.argmax(1, keepdim=True)
    probe = torch.zeros_like(p).scatter_(1, k, 1.0)
    Hu = hvp(probe.reshape(f.shape).to(f.dtype))[0].double().reshape(p.shape)
    denom = spread.gather(1, k)
    ratio = Hu.gather(1, k) / torch.where(denom > 0, denom, 1.0)
    return torch.where(denom > 0, ratio, 0.0).clamp_min(0)
