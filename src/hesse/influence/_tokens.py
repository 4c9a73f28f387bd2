r"""Per-token influence: the score of each counted token of each training sequence.

For a token loss (a causal or masked LM, a token classifier, or ``loss=`` cross-entropy
over ``(n, C, T)`` logits) the term of training sequence :math:`i` in the objective is the
SUM of its token terms, :math:`s_i = w_i \ell_i = \sum_t s_{i,t}` (:math:`s_{i,t}` the
cross-entropy of token :math:`t`, 0 where its label is ``ignore_index``; :math:`w_i` the
counted tokens). So hesse's sequence score splits exactly over the training tokens:

.. math::
    \mathrm{token\_scores}[q, i, t] = \frac1W\, \nabla L_q^\top (H + \lambda I)^{-1}
        \nabla s_{i,t}, \qquad \sum_t \mathrm{token\_scores}[q, i, t] = \mathrm{scores}[q, i],

the predicted change of query :math:`q`'s loss when token :math:`t` of sequence :math:`i` is
dropped from the objective (its label set to ``ignore_index``, :math:`W` held fixed). This
is the training-token attribution of Grosse et al. 2023 ("Studying large language model
generalization with influence functions", token-wise attribution) and kronfluence's
``compute_per_token_scores``. The query side stays the query's MEAN token loss :math:`L_q`
(to score one query token, make it the query's only counted label).

No per-token gradient is formed: with :math:`v_q = (H + \lambda I)^{-1} \nabla L_q` (the
inverse products the scores use), :math:`\nabla s_{i,t}^\top v_q` for all tokens of a batch
is one Jacobian-vector product :math:`J v_q`, computed by double backward:
:math:`g(u) = \nabla_\theta \sum_{i,t} u_{i,t} s_{i,t}` is linear in :math:`u`, and
:math:`\partial (g(u)^\top v_q) / \partial u = J v_q`. Cost: one backward pass per batch
plus one per query and batch, with ``scaled_dot_product_attention`` on its math kernel (the
fused kernels have no double backward).

Token axis: the positions of the batch's labels; for a causal LM position ``t`` is the token
PREDICTED (label ``t``, predicted from positions ``< t``), so position 0 is always 0.
Sequences shorter than the longest (batches are padded separately) are padded with zeros.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ..problem._positions import samples_in
from ..problem.objective import Objective

TOKEN_KINDS = ("cross_entropy", "nll")
TOKEN_TASKS = ("causal-lm", "masked-lm", "token-classification")
"""Hugging Face tasks whose loss has one term per token (``per_token=True`` takes these)."""


def check_token_loss(obj: Objective) -> None:
    """Refuse an objective whose loss does not split into per-token terms hesse can compute.

    Raises:
        ValueError: ``loss_fn=``, a model's own unrecognised loss, a loss other than
            cross-entropy or NLL, per-class weights, or one target per sample (a classifier:
            its one "token" would be the whole sequence, shown as its first token).
    """
    spec = obj.loss_spec
    if spec is not None and _one_target_per_sample(obj):
        raise ValueError(
            "influence(per_token=True): per-token scores need a target per token (labels "
            f"(n, T)); this objective's loss ({obj.loss_source!r}) has one target per sample "
            "(a classifier), so its sequence scores are already the finest. Drop "
            "per_token=True."
        )
    if spec is None or spec.kind not in TOKEN_KINDS or spec.class_weighted:
        raise ValueError(
            "influence(per_token=True): per-token scores need a token cross-entropy or NLL "
            "without class weights (a Hugging Face LM's own loss, or loss=F.cross_entropy over "
            f"(n, C, T) logits); this objective's loss is {obj.loss_source!r}"
            f"{' with class weights' if spec is not None and spec.class_weighted else ''}. "
            "Drop per_token=True for sequence scores."
        )


def _one_target_per_sample(obj: Objective) -> bool:
    """Whether each sample has one target: a sequence classifier, or ``(n,)`` targets."""
    if obj.task is not None:
        return obj.task not in TOKEN_TASKS
    return obj.targets(next(iter(obj.batches()))).dim() < 2


def token_terms(obj: Objective, params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
    r"""``(n_b, T)`` token terms :math:`s_{i,t}` of a batch, summing to each sample's term.

    Causal LMs get a leading zero column: position ``t`` is the token predicted.
    """
    spec = obj.loss_spec
    assert spec is not None  # check_token_loss ran
    out, y = obj.outputs(params, batch), obj.targets(batch)
    if out.dtype in (torch.float16, torch.bfloat16):
        out = out.float()
    ignore = -100 if spec.ignore_index is None else spec.ignore_index
    if spec.kind == "nll":
        terms = F.nll_loss(out, y, reduction="none", ignore_index=ignore)
    else:
        smooth = spec.label_smoothing
        terms = F.cross_entropy(
            out, y, reduction="none", ignore_index=ignore, label_smoothing=smooth
        )
    terms = terms.reshape(samples_in(batch, "influence"), -1)
    return F.pad(terms, (1, 0)) if obj.task == "causal-lm" else terms


def token_scores(
    train: Objective, X: torch.Tensor, W: float, *, progress: bool = False
) -> torch.Tensor:
    r"""``(Q, n, T)`` float64 per-token scores (module docstring) of the inverse products.

    Args:
        train: The training objective (its loss passed :func:`check_token_loss`).
        X: ``(d, Q)`` inverse products :math:`(H + \lambda I)^{-1} \nabla L_q`.
        W: The objective's total weight (counted tokens).
        progress: A progress bar over the training samples.
    """
    quiet = copy.copy(train)
    quiet.progress = False
    names = list(train.params)
    V = [train.space.split(X[:, q]) for q in range(X.shape[1])]
    params = {n: p.detach().requires_grad_(True) for n, p in train.params.items()}
    parts = []
    bar = tqdm(desc="influence: training tokens", unit="batch", leave=False, disable=not progress)
    with bar:
        for batch in quiet.batches():
            parts.append(_batch_scores(train, params, names, V, batch))
            bar.update(1)
    longest = max(p.shape[2] for p in parts)
    rows = torch.cat([F.pad(p, (0, longest - p.shape[2])) for p in parts], 1)
    positions = torch.cat([train.sample_positions(i) for i in range(len(parts))])
    return rows[:, torch.argsort(positions)] / W


def _batch_scores(
    train: Objective,
    params: dict[str, torch.Tensor],
    names: list[str],
    V: list[dict[str, torch.Tensor]],
    batch: Any,
) -> torch.Tensor:
    """``(Q, n_b, T)`` float64: :math:`J v_q` of the batch's token terms, by double backward."""
    # fused attention kernels have no double backward; the math kernel has
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        terms = token_terms(train, params, batch)
        u = torch.zeros_like(terms, requires_grad=True)
        g = torch.autograd.grad(
            (u * terms).sum(),
            [params[n] for n in names],
            create_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        out = []
        for q, v in enumerate(V):
            dot = torch.stack([(gi * v[n].to(gi)).sum() for gi, n in zip(g, names, strict=True)])
            dot = dot.sum()
            (jv,) = torch.autograd.grad(
                dot, u, retain_graph=q < len(V) - 1, allow_unused=True, materialize_grads=True
            )
            out.append(jv.detach().double().cpu())
    return torch.stack(out)
