r"""Kronecker factors over the data: activation and output-gradient covariances per module.

For a factored module with input rows :math:`a` (a bias adds a column of ones; a convolution
unfolds its patches) and output gradients :math:`g` of the backpropagated vectors,

.. math::
    A = \frac{1}{N_A} \sum a a^\top, \qquad G = \frac{1}{W} \sum_c \sum g_c g_c^\top ,

summed over all positions (``"expand"``) or over samples after averaging the inputs and summing
the gradients over the shared positions (``"reduce"``, Eschenhagen et al. 2023), over every
batch and process (``Objective.accumulate``), :math:`W` the objective's total weight and
:math:`N_A` the number of rows in :math:`A`. An embedding's activation factor is the diagonal
of its token counts (always ``"expand"``). Only the positions that some backpropagated vector
reaches enter :math:`A` and :math:`N_A`: padding, ignored labels and the positions that
predict nothing add no row, as they add nothing to the curvature. A position counts as
unreached when its largest gradient over the vectors is at most ``REACH_TOL · eps`` times the
largest of its sample's (dim 0 row's) positions: a gradient that is zero mathematically (the
first query of causal attention) is exactly 0 or round-off of that size, by sample.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from ..problem.objective import Objective
from ._kfac_blocks import Layout, left, right
from ._kfac_capture import BatchPass, Call, Vectors
from ._kfac_layers import Group, Use, conv_padding, factor_shapes

REACH_TOL = 1e3  # in units of the dtype's eps: round-off of a gradient that is zero mathematically


def activation_rows(use: Use, x: torch.Tensor) -> torch.Tensor:
    """A linear or convolutional use's input rows ``(n, positions, cols)``, bias column last."""
    if use.kind == "conv2d":
        m = cast(nn.Conv2d, use.layer)
        pad = cast(tuple[int, int], conv_padding(m))
        a = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=pad, stride=m.stride)
        a = a.transpose(1, 2)
    else:
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    pieces = ([a] if use.weight else []) + ([a.new_ones(*a.shape[:2], 1)] if use.bias else [])
    return torch.cat(pieces, 2)


def gradient_rows(use: Use, g: torch.Tensor) -> torch.Tensor:
    """Output gradients ``(n, positions, outputs)``."""
    if use.kind == "conv2d":
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def sample_gradients(use: Use, call: Call, g: torch.Tensor, rows: int) -> torch.Tensor:
    """Gradients of the use's parameters per row of dim 0, ``(n, rows, cols)`` (matrix layout)."""
    if use.kind != "embedding":
        return torch.einsum("nso,nsc->noc", gradient_rows(use, g), activation_rows(use, call.x))
    ids = call.x.reshape(call.x.shape[0], -1)
    offsets = torch.arange(ids.shape[0], device=ids.device)[:, None] * rows
    return _token_rows(use, ids + offsets, g, ids.shape[0] * rows).reshape(ids.shape[0], rows, -1)


def batch_gradient(use: Use, call: Call, g: torch.Tensor, rows: int) -> torch.Tensor:
    """Gradient of the use's parameters on the whole batch, ``(rows, cols)`` (matrix layout)."""
    if use.kind != "embedding":
        return torch.einsum("nso,nsc->oc", gradient_rows(use, g), activation_rows(use, call.x))
    return _token_rows(use, call.x, g, rows)


def _token_rows(use: Use, index: torch.Tensor, g: torch.Tensor, size: int) -> torch.Tensor:
    """An embedding's output gradients summed into rows ``index`` of a ``(size, width)`` table."""
    gr = gradient_rows(use, g)
    out = gr.new_zeros(size, gr.shape[-1])
    out.index_add_(0, index.reshape(-1), gr.reshape(-1, gr.shape[-1]))
    layer = cast(nn.Embedding, use.layer)
    if layer.padding_idx is not None:  # torch gives the padding row no gradient
        out.reshape(-1, layer.num_embeddings, out.shape[-1])[:, layer.padding_idx] = 0
    return out


def columns(use: Use, layout: Layout) -> torch.Tensor:
    """The columns of the group's matrix that a use's own columns fill."""
    cols = list(range(layout.weight_cols)) if use.weight else []
    return torch.tensor(cols + ([layout.cols - 1] if use.bias else []), dtype=torch.long)


class UseSums:
    """One use's sums on one batch: activation factor, its row count, gradient factor.

    Args:
        use: The factored use.
        objective: The objective (dtype, device, parameter shapes).
        layout: The use's group's matrix layout.
        approx: ``"expand"`` or ``"reduce"``.
        bp: The batch's pass (its calls of the use are ``bp.calls[i]``), or None for the shapes.
        i: The use's index in ``bp.calls``.
        who: The operator's name (for messages).
    """

    def __init__(self, use, objective, layout: Layout, approx: str, bp=None, i=0, who=""):
        self.calls = bp.calls[i] if bp is not None else []
        self.n, self.who = (bp.n if bp is not None else 0), who
        self.peak: list[torch.Tensor | None] = [None] * len(self.calls)
        L, R = factor_shapes(use, objective, layout.rows)
        act, grad = (L, R) if use.kind == "embedding" else (R, L)
        self.use, self.rows = use, layout.rows
        self.reduce = approx == "reduce" and use.kind != "embedding"
        self.act, self.count, self.grad = (
            torch.zeros(s, dtype=objective.dtype, device=objective.device)
            for s in (act, (1,), grad)
        )

    def tensors(self) -> list[torch.Tensor]:
        return [self.act, self.count, self.grad]

    def add_gradients(self, grads: list[torch.Tensor | None]) -> None:
        """Add one vector's output gradients (one per call), and keep each position's largest."""
        for c, g in enumerate(grads):
            if g is None:
                continue
            rows = gradient_rows(self.use, g)
            flat = rows.sum(1) if self.reduce else rows.flatten(0, 1)
            self.grad += flat.T @ flat
            size, seen = rows.abs().amax(-1), self.peak[c]
            self.peak[c] = size if seen is None else torch.maximum(seen, size)

    def add_activations(self) -> None:
        """Add the input rows of the positions that some vector reached (beyond round-off)."""
        for call, peak in zip(self.calls, self.peak, strict=True):
            if peak is not None:
                self._add_rows(call, reached(peak))

    def _add_rows(self, call: Call, live: torch.Tensor) -> None:
        if self.use.kind == "embedding":
            ids = call.x.reshape(call.x.shape[0], -1)
            padding = cast(nn.Embedding, self.use.layer).padding_idx
            kept = live if padding is None else live & (ids != padding)
            self.act += torch.bincount(ids[kept], minlength=self.rows).to(self.act.dtype)
            self.count += live.sum()
            return
        a = activation_rows(self.use, call.x)
        m = live.to(a.dtype)
        if self.reduce:
            _check_samples(self.use, call, self.n, self.who)
            weight = m.sum(1)
            kept = weight > 0
            a = (a * m[..., None]).sum(1)[kept] / weight[kept, None]
            self.act += a.T @ a
            self.count += kept.sum()
        else:
            a = a[live]
            self.act += a.T @ a
            self.count += a.shape[0]


def reached(peak: torch.Tensor) -> torch.Tensor:
    """The positions ``(n, positions)`` whose largest gradient is above their row's round-off."""
    tol = REACH_TOL * torch.finfo(peak.dtype).eps
    return peak > tol * peak.amax(1, keepdim=True)


def factor_terms(
    objective: Objective,
    groups: list[Group],
    layouts: dict[int, Layout],
    vectors: Vectors,
    approx: str,
    who: str,
) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The Kronecker terms ``(L, R)`` of every factored group, over all data (one pass).

    Raises:
        ValueError: a factored parameter is used outside its modules' forward (checked on the
            first batch that backpropagates anything), or non-finite factors (by batch).
    """
    uses = [(gi, u) for gi, g in enumerate(groups) if not g.dense for u in g.uses]
    if not uses:
        return {}
    checked = [False]

    def term(index: int, batch) -> tuple[torch.Tensor, float]:
        bp = BatchPass(objective, [u for _, u in uses], batch, who)
        sums = [
            UseSums(u, objective, layouts[gi], approx, bp, i, who) for i, (gi, u) in enumerate(uses)
        ]
        for j, v in enumerate(vectors(index, bp)):
            check = j == 0 and not checked[0]
            grads, params = bp.gradients(v, with_params=check)
            for s, gs in zip(sums, grads, strict=True):
                s.add_gradients(gs)
            if check:
                check_coverage(groups, layouts, uses, bp, grads, params, who)
                checked[0] = True
        for s in sums:
            s.add_activations()
        return torch.cat([t.reshape(-1) for s in sums for t in s.tensors()]), bp.w

    flat = objective.accumulate(term)
    sizes = [UseSums(u, objective, layouts[gi], approx).tensors() for gi, u in uses]
    pieces = iter(torch.split(flat, [t.numel() for ts in sizes for t in ts]))
    terms: dict[int, list] = {gi: [] for gi, g in enumerate(groups) if not g.dense}
    for (gi, use), shapes in zip(uses, sizes, strict=True):
        act, count, grad = (next(pieces).reshape(t.shape) for t in shapes)
        act = act / count if float(count) > 0 else torch.zeros_like(act)
        L, R = (act, grad) if use.kind == "embedding" else (grad, act)
        terms[gi].append((L, _embed(R, columns(use, layouts[gi]), layouts[gi].cols)))
    return terms


def _check_samples(use: Use, call: Call, n: int, who: str) -> None:
    """Refuse ``"reduce"`` on a module whose input's dim 0 is not the batch's samples.

    Raises:
        ValueError: naming the module.
    """
    if call.x.shape[0] != n:
        raise ValueError(
            f"{who}(approx='reduce'): module {use.module!r} is called on an input with "
            f"{call.x.shape[0]} rows in dim 0 for a batch of {n} samples, so its shared "
            "positions cannot be averaged per sample; use approx='expand', or a model whose "
            "modules take the samples along dim 0."
        )


def _embed(R: torch.Tensor, idx: torch.Tensor, cols: int) -> torch.Tensor:
    """A use's column factor, zero-padded to the group's columns.

    An embedding tied to a head with a bias has no bias column.
    """
    if len(idx) == cols:
        return R
    out = R.new_zeros(cols, cols)
    out[idx[:, None], idx[None, :]] = R
    return out


def check_coverage(groups, layouts, uses, bp: BatchPass, grads, params, who: str) -> None:
    """Refuse a factored parameter whose gradient the recorded module calls do not explain.

    Raises:
        ValueError: naming the parameter and its modules (it is used outside their forward).
    """
    rebuilt: dict[str, torch.Tensor] = {}
    for (gi, use), calls, gs in zip(uses, bp.calls, grads, strict=True):
        layout = layouts[gi]
        for call, g in zip(calls, gs, strict=True):
            if g is None:
                continue
            M = g.new_zeros(1, layout.rows, layout.cols)
            M[0][:, columns(use, layout)] = batch_gradient(use, call, g, layout.rows)
            for name, t in layout.from_matrix(M).items():
                rebuilt[name] = rebuilt.get(name, 0) + t[0]
    eps = torch.finfo(bp.f.dtype).eps
    for gi, layout in layouts.items():
        autos = {name: _dense_gradient(params[name], bp.params[name]) for name in layout.names}
        # relative to the whole layout's gradient: a parameter whose true gradient is zero up to
        # round-off (a key bias, which softmax cancels) must not be refused for its round-off
        scale = float(torch.linalg.vector_norm(torch.stack([a.norm() for a in autos.values()])))
        for name, auto in autos.items():
            gap = float((rebuilt.get(name, torch.zeros_like(auto)) - auto).norm())
            if gap > max(1e-6, 1e3 * eps) * scale:
                raise ValueError(
                    f"{who}: parameter {name!r} gets a gradient that the calls of its module(s) "
                    f"{groups[gi].label} do not explain (difference {gap / scale:.3g} relative "
                    "to the module's gradient): the model uses it outside their forward "
                    "(e.g. F.linear(x, module.weight) in a parent's forward, as "
                    "nn.MultiheadAttention does with out_proj), and Kronecker factors would miss "
                    "that use. Leave it out of the Objective (params=...)."
                )


def _dense_gradient(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """An autograd gradient as a dense tensor (zeros for a parameter the loss did not reach)."""
    if g is None:
        return torch.zeros_like(like)
    return g.to_dense() if g.is_sparse else g


def per_sample(P: torch.Tensor, n: int, use: Use, who: str) -> torch.Tensor:
    """Rows of dim 0 summed into the ``n`` samples they belong to (sample-major).

    Raises:
        ValueError: dim 0 is not a multiple of the sample count.
    """
    if P.shape[0] == n:
        return P
    if P.shape[0] % n:
        raise ValueError(
            f"{who}: module {use.module!r} is called on {P.shape[0]} rows for a batch of {n} "
            "samples, so its per-sample gradients (EKFAC's scalings) cannot be told apart; "
            "dim 0 of its input must hold the samples (or a whole number of rows per sample)."
        )
    return P.reshape(n, -1, *P.shape[1:]).sum(1)


def eigen_scalings(
    objective: Objective,
    groups: list[Group],
    layouts: dict[int, Layout],
    bases: dict[int, tuple],
    vectors: Vectors,
    who: str,
) -> dict[int, torch.Tensor]:
    r"""EKFAC's scalings :math:`S = \frac1W \sum_{n,c} (Q_L^\top \nabla_{n,c} Q_R)^{\odot 2}`.

    :math:`\nabla_{n,c}` is sample :math:`n`'s gradient of the group's matrix for vector
    :math:`c` (summed over a tied weight's uses); the result is float64, ``(rows, cols)``.
    The rows are rotated before the per-sample matrices are formed,
    :math:`Q_L^\top (\sum_t g_t a_t^\top) Q_R = \sum_t (Q_L^\top g_t)(Q_R^\top a_t)^\top`
    (the activations once per batch), and a group with one position per sample needs no
    per-sample matrix: :math:`S \mathrel{+}= ((Q_L^\top g)^{\odot 2})^\top (Q_R^\top a)^{\odot 2}`.
    """
    uses = [(gi, u) for gi, g in enumerate(groups) if not g.dense for u in g.uses]
    if not uses:
        return {}
    shapes = {gi: (layout.rows, layout.cols) for gi, layout in layouts.items()}

    def term(index: int, batch) -> tuple[torch.Tensor, float]:
        bp = BatchPass(objective, [u for _, u in uses], batch, who)
        S = {
            gi: torch.zeros(s, dtype=torch.float64, device=objective.device)
            for gi, s in shapes.items()
        }
        acts = [
            [_rotated_activations(use, call, layouts[gi], bases[gi][1]) for call in calls]
            for (gi, use), calls in zip(uses, bp.calls, strict=True)
        ]
        single = _one_row_groups(uses, acts, bp.n)
        for v in vectors(index, bp):
            grads, _ = bp.gradients(v)
            P: dict[int, torch.Tensor] = {}
            for (gi, use), calls, a_rot, gs in zip(uses, bp.calls, acts, grads, strict=True):
                QL, QR = bases[gi]
                for call, a, g in zip(calls, a_rot, gs, strict=True):
                    if g is None:
                        continue
                    if gi in single:
                        S[gi] += _squared_rows(gradient_rows(use, g)[:, 0], QL).T @ single[gi]
                        continue
                    part = _rotated_gradients(use, call, g, layouts[gi], QL, QR, a)
                    part = per_sample(part, bp.n, use, who)
                    P[gi] = P[gi] + part if gi in P else part
            for gi, M in P.items():
                S[gi] += (M.double() ** 2).sum(0)
        return torch.cat([S[gi].reshape(-1) for gi in shapes]), bp.w

    flat = objective.accumulate(term)
    pieces = torch.split(flat, [r * c for r, c in shapes.values()])
    return {gi: p.reshape(shapes[gi]) for gi, p in zip(shapes, pieces, strict=True)}


def _rotated_activations(use: Use, call: Call, layout: Layout, QR) -> torch.Tensor | None:
    """A linear or convolutional call's input rows in the group's columns, times ``Q_R``.

    ``(n, positions, cols)``; None for an embedding (its rows are tokens, not activations).
    """
    if use.kind == "embedding":
        return None
    a, idx = activation_rows(use, call.x), columns(use, layout).to(call.x.device)
    if QR is not None:
        return a @ QR[idx]
    out = a.new_zeros(*a.shape[:-1], layout.cols)
    out[..., idx] = a
    return out


def _squared_rows(g: torch.Tensor, QL) -> torch.Tensor:
    """Rows ``g`` times ``Q_L`` (``Q_L^T g`` for each row), squared in float64."""
    return (g if QL is None else g @ QL).double() ** 2


def _one_row_groups(uses, acts, n: int) -> dict[int, torch.Tensor]:
    """Groups with a single call of a single use, one position per sample along dim 0.

    Returns:
        Per such group, its rotated activations squared in float64, ``(n, cols)``.
    """
    calls: dict[int, list] = {}
    for (gi, _), a_rot in zip(uses, acts, strict=True):
        calls.setdefault(gi, []).extend(a_rot)
    return {
        gi: cs[0][:, 0].double() ** 2
        for gi, cs in calls.items()
        if len(cs) == 1 and cs[0] is not None and cs[0].shape[:2] == (n, 1)
    }


def _rotated_gradients(use: Use, call: Call, g, layout: Layout, QL, QR, a) -> torch.Tensor:
    """One call's gradients of the group's matrix per row of dim 0, in the eigenbasis."""
    if a is not None:
        gr = gradient_rows(use, g)
        return torch.einsum("nso,nsc->noc", gr if QL is None else gr @ QL, a)
    part = sample_gradients(use, call, g, layout.rows)
    M = part.new_zeros(*part.shape[:2], layout.cols)
    M[:, :, columns(use, layout)] = part
    return right(left(QL, M, transpose=True), QR)
