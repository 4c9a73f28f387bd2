"""Linear stability at the training learning rate, stated as plain-language verdicts.

Gradient descent with step ``eta`` is linearly stable at a minimum only when the sharpness
``lambda_max <= 2/eta``; trained with GD, networks drift to ``lambda_max ~ 2/eta`` and stay
there (Cohen et al. 2021, "Gradient descent on neural networks typically occurs at the edge
of stability"). For SGD, linear stability at a global minimum bounds the whole trace:
``Tr(H) <= 2/eta`` (Wu & Su 2023, "The implicit regularization of dynamical stability in
stochastic gradient descent"; Ma & Ying 2021, "On linear stability of SGD and
input-smoothness of neural networks"; Wu, Wang & Su 2022 for the Frobenius-norm form).
"""

from __future__ import annotations

from dataclasses import dataclass

EDGE = 0.1
"""Relative band around ``2/eta`` that counts as "at the edge of stability"."""


@dataclass(frozen=True)
class Verdict:
    """One stability criterion at one learning rate.

    Attributes:
        criterion: ``"GD"`` or ``"SGD"``.
        quantity: ``"lambda_max"`` or ``"trace"``.
        value: the measured quantity.
        low: lower end of its uncertainty (residual bound or 95% CI).
        high: upper end.
        threshold: ``2 / lr``.
        ratio: ``value / threshold``.
        status: ``"stable"``, ``"edge"``, ``"unstable"`` or ``"inconclusive"``.
        text: the verdict in one or two sentences, with the numbers.
        reference: where the criterion comes from.
    """

    criterion: str
    quantity: str
    value: float
    low: float
    high: float
    threshold: float
    ratio: float
    status: str
    text: str
    reference: str


def gd_verdict(lam_max: float, residual: float, lr: float) -> Verdict:
    """Full-batch gradient descent: ``lambda_max`` against ``2/lr``.

    Example:
        >>> gd_verdict(5.0, 1e-6, lr=0.1).status
        'stable'
    """
    threshold, ratio = 2.0 / lr, lam_max * lr / 2.0
    numbers = f"λmax = {lam_max:.4g} against 2/η = {threshold:.4g} (ratio {ratio:.2f})"
    if abs(ratio - 1.0) <= EDGE:
        status = "edge"
        text = f"At the edge of stability: {numbers}; full-batch GD keeps the sharpness there."
    elif ratio < 1.0:
        status = "stable"
        text = f"Stable for gradient descent at η = {lr:.4g}: {numbers}."
    else:
        status = "unstable"
        text = (
            f"Unstable for full-batch gradient descent at η = {lr:.4g}: {numbers}; GD steps "
            f"would grow along the top eigenvector by |1 - ηλmax| = {abs(1 - lr * lam_max):.3g} "
            "each (mini-batch noise and non-quadratic terms can still keep SGD here)."
        )
    reference = "Cohen et al. 2021, edge of stability"
    return Verdict(
        "GD", "lambda_max", lam_max, lam_max - residual, lam_max + residual, threshold, ratio,
        status, text, reference,
    )  # fmt: skip


def sgd_verdict(trace: float, ci95: tuple[float, float], lr: float, loss: float) -> Verdict:
    """SGD at a global minimum: ``Tr(H)`` (with its 95% CI) against ``2/lr``.

    Example:
        >>> sgd_verdict(50.0, (45.0, 55.0), lr=0.1, loss=0.0).status
        'unstable'
    """
    threshold, (lo, hi) = 2.0 / lr, ci95
    numbers = f"Tr(H) = {trace:.4g} (95% CI {lo:.4g} – {hi:.4g}) against 2/η = {threshold:.4g}"
    if hi < threshold:
        status = "stable"
        text = f"Consistent with an SGD-stable minimum at η = {lr:.4g}: {numbers}."
    elif lo > threshold:
        status = "unstable"
        text = (
            f"Not an SGD-stable minimum at η = {lr:.4g} by the trace criterion: {numbers}; "
            "SGD with this step would escape a minimum this curved."
        )
    else:
        status = "inconclusive"
        text = f"Inconclusive: {numbers}; the confidence interval straddles the threshold."
    if loss > 0.05:
        text += (
            f" The criterion is derived at a global minimum (loss ~ 0); at the loss {loss:.3g} "
            "read it as an indication."
        )
    reference = "Wu & Su 2023; Ma & Ying 2021"
    return Verdict(
        "SGD", "trace", trace, lo, hi, threshold, trace * lr / 2.0, status, text, reference
    )
