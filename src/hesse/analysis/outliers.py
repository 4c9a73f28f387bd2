"""Bulk and outliers of the top of the spectrum, compared with the number of classes.

The Hessian (and the GGN) of a trained classifier has a bulk of small eigenvalues and a few
outliers above it: about ``C - 1`` for cross-entropy and ``C`` for the squared loss, with
``C`` classes (Sagun et al. 2017, "Empirical analysis of the Hessian of over-parametrized
neural networks"; Papyan 2019, "Measurements of three-level hierarchical structure in the
outliers in the spectrum of deepnet Hessians"; Papyan 2020, "Traces of class/cross-class
structure pervade deep learning spectra"). The outliers are found here by the eigengap
heuristic: the count ``n`` maximises the relative gap ``lambda_n / lambda_{n+1}`` among the
positive top eigenvalues.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import losses

EXPECTED = {
    "cross_entropy": (-1, "C - 1 for cross-entropy"),
    "nll": (-1, "C - 1 for cross-entropy (NLL of log-softmax)"),
    "mse": (0, "C for squared loss"),
}
"""Offset from the number of classes to the expected number of outliers, for torch's losses.

Every other loss that :mod:`hesse.losses` names predicts its own count (``OutputLoss.outliers``:
the directions in which its output Hessian curves upward: ``C - 1`` for all comp-sum losses,
``C - 2`` for the Z-loss, 1 or 2 for AnyLoss)."""


@dataclass(frozen=True)
class Outliers:
    """How many top eigenvalues stand above the bulk.

    Attributes:
        n_classes: number of classes ``C`` (None when unknown).
        expected: the outlier count the loss predicts (None when unknown).
        expected_rule: how ``expected`` follows from ``C`` (or why it is unknown).
        n_outliers: eigenvalues before the largest relative gap (None with < 2 positive ones).
        gap_ratio: ``lambda_n / lambda_{n+1}`` at that gap.
        gaps: every ratio ``lambda_i / lambda_{i+1}`` over the positive top eigenvalues.
        matches: whether ``n_outliers == expected`` (None when either is unknown).
        text: one plain-language paragraph.
    """

    n_classes: int | None
    expected: int | None
    expected_rule: str
    n_outliers: int | None
    gap_ratio: float | None
    gaps: tuple[float, ...]
    matches: bool | None
    text: str


def find_outliers(
    values: list[float], *, n_classes: int | None, loss_name: str, loss: float
) -> Outliers:
    """Locate the largest relative eigengap and compare the count with the classes.

    Args:
        values: top eigenvalues, descending.
        n_classes: number of classes ``C``, or None.
        loss_name: ``"cross_entropy"``, ``"mse"``, a :mod:`hesse.losses` name, or another
            loss (no prediction then).
        loss: the training loss, quoted when explaining a mismatch.

    Returns:
        Outliers.

    Example:
        >>> find_outliers([9.0, 8.0, 1.0, 0.9], n_classes=3, loss_name="cross_entropy",
        ...               loss=0.1).n_outliers
        2
    """
    positive = [v for v in values if v > 0]
    gaps = tuple(a / b for a, b in zip(positive, positive[1:], strict=False))
    n = max(range(len(gaps)), key=gaps.__getitem__) + 1 if gaps else None
    ratio = gaps[n - 1] if n else None
    expected, rule = expected_outliers(n_classes, loss_name)
    matches = None if n is None or expected is None else n == expected
    text = _describe(values, n, gaps, expected, rule, matches, loss)
    return Outliers(n_classes, expected, rule, n, ratio, gaps, matches, text)


def expected_outliers(n_classes: int | None, loss_name: str) -> tuple[int | None, str]:
    """The outlier count that a loss predicts for ``C`` classes, and the rule behind it.

    Args:
        n_classes: ``C``, or None.
        loss_name: torch's ``"cross_entropy"``, ``"mse"``, ``"nll"``, or a :mod:`hesse.losses`
            name (``"gce:q=0.7"``, ``"zloss:a=1,b=1"``, as ``Objective.loss_spec.kind`` has it).

    Returns:
        ``(count, rule)``; the count is None without a prediction or without ``C``.

    Example:
        >>> expected_outliers(10, "gce:q=0.7")[0], expected_outliers(10, "mse")[0]
        (9, 10)
    """
    if loss_name in EXPECTED:
        offset, rule = EXPECTED[loss_name]
        count = None if n_classes is None else n_classes + offset
    else:
        try:
            loss = losses.parse(loss_name)
        except ValueError:
            return None, f"no prediction for the loss {loss_name!r}"
        rule = f"{loss.outlier_rule} for {loss_name}"
        count = None if n_classes is None else loss.outliers(n_classes)
        if count is None and n_classes is not None:
            return None, f"no prediction for {loss_name}: {loss.outlier_rule}"
    if n_classes is None:
        return None, rule + " (number of classes unknown; pass n_classes)"
    return count, rule


def _describe(values, n, gaps, expected, rule, matches, loss) -> str:
    if n is None:
        return "Fewer than two positive top eigenvalues: no bulk/outlier split to report."
    second = sorted(gaps, reverse=True)[1] if len(gaps) > 1 else 1.0
    found = (
        f"{n} eigenvalue{'s stand' if n > 1 else ' stands'} above the bulk: the largest gap "
        f"ratio among the top {len(values)} is after λ{n} (λ{n}/λ{n + 1} = {gaps[n - 1]:.3g}; "
        f"the next largest gap is {second:.3g})."
    )
    if expected is None:
        return f"{found} Expected count: {rule}."
    verdict = f" The loss predicts {rule} = {expected} outliers (Sagun et al. 2017; Papyan 2020)"
    if matches:
        return found + verdict + ": the outlier structure is there."
    return (
        found
        + verdict
        + ", which this spectrum does not show. "
        + _why(n, expected, len(values), gaps, loss)
    )


def _why(n: int, expected: int, k: int, gaps: tuple[float, ...], loss: float) -> str:
    if expected >= k:
        return (
            f"Only {k} eigenvalues were computed, fewer than the {expected + 1} needed to see a "
            f"gap after λ{expected}; rerun with --k {expected + 5}."
        )
    if max(gaps) < 1.5:
        return (
            "No gap stands out (all ratios below 1.5): the top of the spectrum decays smoothly, "
            f"which happens early in training or at a very low loss (here {loss:.3g}), when "
            "the class structure of the gradients is weak."
        )
    return (
        f"The gap after λ{n} is larger than the one after λ{expected} "
        f"({gaps[n - 1]:.3g} against {gaps[expected - 1]:.3g}). The outliers come from the "
        "class means of the gradients; they leave the bulk as training separates the classes "
        f"and sink back as the loss goes to zero (Papyan 2020), so at this loss ({loss:.3g}) "
        f"{abs(n - expected)} of the predicted outliers {'are' if abs(n - expected) > 1 else 'is'}"
        f" {'inside the bulk' if n < expected else 'split off from it'}."
    )
