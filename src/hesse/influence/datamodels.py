r"""Attribution scored against retraining: the linear datamodeling score and mislabel AUC.

- :func:`retrain_subsets`: the ground truth. Train on ``M`` random :math:`\alpha`-fraction
  subsets :math:`S_m` of the training set (a user function does the training) and record the
  query outputs :math:`f_q(\theta_{S_m})`; resumable, written atomically after each subset.
- :func:`lds`: the linear datamodeling score (Park et al. 2023, "TRAK"; Ilyas et al. 2022,
  "Datamodels"): per query, the Spearman correlation over subsets between the outputs and
  the scores summed over each subset, averaged over queries, with a bootstrap interval.
- :func:`mislabel_auc`: how well self-influence ranks the flipped labels first (ROC AUC),
  with a bootstrap interval.

With hesse's sign (``hesse.influence``: a score predicts how much query ``q``'s LOSS rises when
point ``i`` is removed), a model trained on :math:`S` has the predicted loss
:math:`L_q - \sum_{i \in S} \mathrm{scores}[q, i]` up to a constant, so the prediction for a
loss is :math:`-\sum_{i\in S}` scores and for a margin (higher is better) :math:`+\sum_{i\in S}`
scores; ``output=`` says which the outputs are.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

OUTPUTS = ("loss", "margin")


@dataclass(frozen=True)
class Interval:
    """A statistic with a percentile-bootstrap confidence interval.

    Attributes:
        value: The statistic on the data as given.
        low: Lower end of the interval.
        high: Upper end.
        confidence: Its level (e.g. 0.95).
        resamples: Bootstrap resamples drawn.
    """

    value: float
    low: float
    high: float
    confidence: float
    resamples: int

    def overlaps(self, other: Interval) -> bool:
        """Whether the two intervals share a point (a tie at this confidence)."""
        return self.low <= other.high and other.low <= self.high


@dataclass(frozen=True)
class LDSResult:
    """The linear datamodeling score.

    Attributes:
        score: Mean over queries of the per-query Spearman correlation, with a bootstrap
            interval over queries.
        per_query: ``(n_query,)`` float64 Spearman correlations (NaN where a query's outputs
            or predictions are constant over the subsets; those are left out of the mean).
        n_subsets: Subsets (retrained models) the correlations are over.
        n_valid: Queries with a defined correlation.
    """

    score: Interval
    per_query: torch.Tensor
    n_subsets: int
    n_valid: int


@dataclass(frozen=True)
class GroundTruth:
    r"""Query outputs of models retrained on random subsets (from :func:`retrain_subsets`).

    Attributes:
        subsets: ``(M, n_train)`` bool masks of the training points each model saw.
        outputs: ``(M, n_query)`` float64 query outputs of each model.
        seeds: ``(M,)`` the seed each subset was drawn and trained with.
        alpha: The fraction of the training set in each subset.
        seconds: Wall time of the retraining done by this call (0 when all was cached).
    """

    subsets: torch.Tensor
    outputs: torch.Tensor
    seeds: torch.Tensor
    alpha: float
    seconds: float = 0.0


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dimension, ties given their average rank (as Spearman needs)."""
    rows = x.reshape(-1, x.shape[-1])
    order = rows.argsort(dim=-1, stable=True)
    ordered = rows.gather(-1, order)
    r = torch.empty_like(rows, dtype=torch.float64)
    for i in range(rows.shape[0]):
        _, inverse, counts = torch.unique_consecutive(
            ordered[i], return_inverse=True, return_counts=True
        )
        ends = counts.cumsum(0).double()
        average = ends - (counts.double() - 1) / 2  # 1-based average rank of each tie group
        r[i, order[i]] = average[inverse]
    return r.reshape(x.shape)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Spearman correlation of ``a`` and ``b`` ``(..., m)``; NaN for a constant row."""
    ra, rb = ranks(a.double()), ranks(b.double())
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    den = ra.norm(dim=-1) * rb.norm(dim=-1)
    return torch.where(den > 0, (ra * rb).sum(-1) / den.clamp_min(1e-300), torch.nan)


def bootstrap(
    values: torch.Tensor, statistic: Callable[[torch.Tensor], float], *, resamples: int = 1000,
    confidence: float = 0.95, seed: int = 0,
) -> Interval:  # fmt: skip
    """Percentile bootstrap of ``statistic(indices)`` over ``len(values)`` items drawn with repeats.

    Args:
        values: ``(n,)`` the items (only their count is used; ``statistic`` indexes them).
        statistic: Maps ``(n,)`` resampled indices to the statistic.
        resamples: Bootstrap resamples.
        confidence: Level of the two-sided interval.
        seed: Seed of the resampling.

    Returns:
        Interval: the statistic on all items, and the percentiles of the resamples that are
        not NaN.

    Raises:
        ValueError: ``confidence`` outside (0, 1).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"bootstrap: confidence must be in (0, 1), got {confidence!r}; e.g. 0.95.")
    n = values.shape[0]
    g = torch.Generator().manual_seed(seed)
    draws = torch.tensor(
        [statistic(torch.randint(0, n, (n,), generator=g)) for _ in range(resamples)],
        dtype=torch.float64,
    )
    draws = draws[~draws.isnan()]
    tail = (1 - confidence) / 2
    low, high = torch.quantile(draws, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    whole = statistic(torch.arange(n))
    return Interval(whole, float(low), float(high), confidence, resamples)


def lds(
    scores: torch.Tensor, subsets: torch.Tensor, outputs: torch.Tensor, *, output: str = "loss",
    resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
) -> LDSResult:  # fmt: skip
    r"""The linear datamodeling score of attribution scores against retrained outputs.

    .. math::
        \mathrm{LDS} = \frac{1}{Q} \sum_q \rho_{\mathrm{Spearman}}\Big(
            \big(\pm\textstyle\sum_{i \in S_m} \mathrm{scores}[q, i]\big)_m,\;
            \big(f_q(\theta_{S_m})\big)_m \Big)

    with ``-`` for losses and ``+`` for margins (module docstring). Park et al. 2023, "TRAK:
    Attributing model behavior at scale", section 2.

    Args:
        scores: ``(n_query, n_train)`` attribution scores in hesse's convention (a peer's
            scores: multiply by the factor in ``hesse.influence``'s docstring first; the
            correlation is blind to positive scale, not to sign).
        subsets: ``(M, n_train)`` bool masks (``GroundTruth.subsets``).
        outputs: ``(M, n_query)`` outputs of the models trained on them.
        output: ``"loss"`` (lower is better) or ``"margin"`` (higher is better).
        resamples: Bootstrap resamples over queries.
        confidence: Level of the interval.
        seed: Seed of the bootstrap.

    Returns:
        LDSResult.

    Raises:
        ValueError: shapes that do not match, fewer than 3 subsets, or an unknown ``output``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> S = torch.rand(50, 20, generator=g) < 0.5
        >>> tau = torch.randn(3, 20, generator=g, dtype=torch.float64)
        >>> lds(tau, S, S.double() @ tau.T, output="margin").score.value
        1.0
    """
    if output not in OUTPUTS:
        raise ValueError(f"lds: output must be one of {OUTPUTS}, got {output!r}.")
    M, n = subsets.shape
    if scores.shape[1] != n or outputs.shape != (M, scores.shape[0]) or M < 3:
        raise ValueError(
            f"lds: expected scores (n_query, n_train), subsets (M, n_train) and outputs "
            f"(M, n_query) with M >= 3; got scores {tuple(scores.shape)}, subsets "
            f"{tuple(subsets.shape)}, outputs {tuple(outputs.shape)}."
        )
    predicted = subsets.double() @ scores.double().T * (-1.0 if output == "loss" else 1.0)
    rho = spearman(predicted.T, outputs.double().T)
    valid = rho[~rho.isnan()]
    if valid.numel() == 0:
        raise ValueError(
            "lds: every query's outputs or predictions are constant over subsets, so no "
            "correlation is defined; check that train_fn's outputs depend on the subset."
        )
    score = bootstrap(
        valid, lambda i: float(valid[i].mean()), resamples=resamples, confidence=confidence,
        seed=seed,
    )  # fmt: skip
    return LDSResult(score, rho, M, int(valid.numel()))


def mislabel_auc(
    self_influence: torch.Tensor, flipped: torch.Tensor, *, resamples: int = 1000,
    confidence: float = 0.95, seed: int = 0,
) -> Interval:  # fmt: skip
    r"""ROC AUC of ranking flipped labels first by self-influence, with a bootstrap interval.

    :math:`\mathrm{AUC} = P(s_{flipped} > s_{clean}) + \frac12 P(s_{flipped} = s_{clean})`,
    from the Mann-Whitney rank sum (Koh & Liang 2017, section 5.4, for the use of
    self-influence to find mislabelled points).

    Args:
        self_influence: ``(n,)`` each point's score on its own loss (higher: more suspect).
        flipped: ``(n,)`` bool, the points whose labels were flipped.
        resamples: Bootstrap resamples over points.
        confidence: Level of the interval.
        seed: Seed of the bootstrap.

    Returns:
        Interval: the AUC (0.5: chance, 1: every flipped point ranked first).

    Raises:
        ValueError: shapes differ, or no flipped or no clean point.
    """
    s, f = self_influence.double().flatten(), flipped.bool().flatten()
    if s.shape != f.shape or not 0 < int(f.sum()) < f.numel():
        raise ValueError(
            f"mislabel_auc: need self_influence and flipped of one shape (got "
            f"{tuple(self_influence.shape)}, {tuple(flipped.shape)}) with flipped and clean "
            "points both present."
        )

    def auc(i: torch.Tensor) -> float:
        pos = int(f[i].sum())
        neg = i.numel() - pos
        if pos == 0 or neg == 0:
            return float("nan")
        r = ranks(s[i])
        return float((r[f[i]].sum() - pos * (pos + 1) / 2) / (pos * neg))

    return bootstrap(s, auc, resamples=resamples, confidence=confidence, seed=seed)


def retrain_subsets(
    train_fn: Callable[[torch.Tensor, int], torch.Tensor], n_train: int, *,
    n_subsets: int = 100, alpha: float = 0.5, seed: int = 0, path: str | Path | None = None,
    progress: bool = False,
) -> GroundTruth:  # fmt: skip
    r"""Train on ``n_subsets`` random :math:`\alpha`-fraction subsets; record the query outputs.

    Subset ``m`` is ``round(alpha * n_train)`` indices drawn without replacement by a
    generator seeded with ``seed + m``, and ``train_fn(indices, seed + m)`` trains a model on
    them (its own seed, for its initialization and batches) and returns the ``(n_query,)``
    query outputs: margins for classification, losses for language models (say which to
    :func:`lds`). With ``path``, every finished subset is saved (written to a temporary file,
    then renamed: a killed run leaves the last complete file), and a later call with the same
    settings resumes after the subsets found there.

    Args:
        train_fn: ``(indices (k,) long, seed) -> (n_query,) outputs``.
        n_train: Size of the training set.
        n_subsets: :math:`M`, the models to train.
        alpha: Fraction of the training set per subset, in (0, 1).
        seed: First seed.
        path: A ``.pt`` file to resume from and save to, or None.
        progress: A progress bar with the time left.

    Returns:
        GroundTruth.

    Raises:
        ValueError: ``alpha`` outside (0, 1), ``n_subsets < 1``, or a file at ``path`` with
            other settings.
    """
    if not 0 < alpha < 1 or n_subsets < 1:
        raise ValueError(
            f"retrain_subsets: need 0 < alpha < 1 and n_subsets >= 1, got alpha={alpha!r} and "
            f"n_subsets={n_subsets!r} (TRAK's LDS uses alpha=0.5)."
        )
    size = round(alpha * n_train)
    masks, outs = _resume(path, n_train, alpha, seed)
    from tqdm.auto import tqdm

    start = time.perf_counter()
    for m in tqdm(range(len(outs), n_subsets), disable=not progress, desc="retraining"):
        idx = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed + m))[:size]
        mask = torch.zeros(n_train, dtype=torch.bool)
        mask[idx] = True
        outs.append(torch.as_tensor(train_fn(idx.sort().values, seed + m)).double().flatten())
        masks.append(mask)
        if path is not None:
            _save(path, masks, outs, n_train, alpha, seed)
    return GroundTruth(
        torch.stack(masks[:n_subsets]),
        torch.stack(outs[:n_subsets]),
        torch.arange(seed, seed + n_subsets),
        alpha,
        time.perf_counter() - start,
    )


def _resume(path, n_train: int, alpha: float, seed: int) -> tuple[list, list]:
    """The masks and outputs saved at ``path`` (empty lists without a file)."""
    if path is None or not Path(path).exists():
        return [], []
    saved = torch.load(path, weights_only=True)
    if (saved["n_train"], saved["alpha"], saved["seed"]) != (n_train, alpha, seed):
        raise ValueError(
            f"retrain_subsets: {path} holds subsets for n_train={saved['n_train']}, "
            f"alpha={saved['alpha']}, seed={saved['seed']}, not {n_train}, {alpha}, {seed}; "
            "pass another path or delete it."
        )
    return list(saved["subsets"]), list(saved["outputs"])


def _save(path, masks: Sequence, outs: Sequence, n_train: int, alpha: float, seed: int) -> None:
    """Write the finished subsets atomically (a temporary file, then a rename)."""
    tmp = f"{path}.tmp"
    state = {"subsets": torch.stack(list(masks)), "outputs": torch.stack(list(outs))}
    torch.save(state | {"n_train": n_train, "alpha": alpha, "seed": seed}, tmp)
    os.replace(tmp, path)
