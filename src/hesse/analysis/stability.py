"""Linear stability at the training learning rate, stated as plain-language verdicts.

Gradient descent with step ``eta`` is linearly stable at a minimum only when the sharpness
``lambda_max <= 2/eta``; trained with GD, networks drift to ``lambda_max ~ 2/eta`` and stay
there (Cohen et al. 2021, "Gradient descent on neural networks typically occurs at the edge
of stability"). For SGD, linear stability at a global minimum bounds the whole trace:
``Tr(H) <= 2/eta`` (Wu & Su 2023, "The implicit regularization of dynamical stability in
stochastic gradient descent"; Ma & Ying 2021, "On linear stability of SGD and
input-smoothness of neural networks"; Wu, Wang & Su 2022 for the Frobenius-norm form).
With heavy-ball momentum ``beta`` the GD threshold is ``(2 + 2 beta)/eta``; for Adam the
quantity that settles at its threshold ``(2 + 2 beta1)/((1 - beta1) eta)`` is the
preconditioned sharpness ``lambda_max(P^-1 H)`` (Cohen et al. 2022, "Adaptive gradient methods
at the edge of stability"), which needs the optimizer's second-moment state, so plain
``lambda_max(H)`` gets no Adam verdict.
"""

from __future__ import annotations

from dataclasses import dataclass

EDGE = 0.1
"""Relative band around ``2/eta`` that counts as "at the edge of stability"."""

OPTIMIZERS = ("sgd", "momentum", "adam")
"""Optimizers the verdicts know: plain (S)GD, heavy-ball momentum, Adam (no verdict)."""


def omitted(optimizer: str, momentum: float = 0.0) -> str | None:
    """Why verdicts for ``optimizer`` are left out (None when they apply).

    Example:
        >>> omitted("sgd") is None
        True
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"stability: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"stability: momentum must lie in [0, 1), got {momentum}.")
    if optimizer == "adam":
        return (
            "No stability verdict for Adam: its sharpness threshold "
            "(2 + 2β1)/((1 - β1)η) applies to the preconditioned sharpness λmax(P⁻¹H), "
            "P = diag(√v̂ + ε), which needs the optimizer's second-moment state (Cohen et al. "
            "2022); λmax(H) against 2/η would mean nothing for an Adam-trained model."
        )
    return None


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


def gd_verdict(
    lam_max: float, residual: float, lr: float, *, converged: bool = True, momentum: float = 0.0
) -> Verdict:
    """Full-batch gradient descent: ``lambda_max`` against ``2/lr``, with its uncertainty.

    With heavy-ball momentum ``beta`` the threshold is ``(2 + 2 beta)/lr`` (the linear
    recursion on a quadratic is stable up to that sharpness).

    The residual bound ``r`` puts an eigenvalue within ``[lambda_max - r, lambda_max + r]``;
    the verdict is "stable" only when the whole interval lies below ``2/lr``, "unstable" only
    when it lies above ``2/lr`` and leaves the edge band ``(1 ± EDGE) 2/lr``, "edge" when it
    lies inside the band (on either side of ``2/lr``, or across it), and "inconclusive" when
    it reaches across ``2/lr`` and out of the band. An unconverged Lanczos run only bounds
    ``lambda_max`` from below (a Ritz value never exceeds the largest eigenvalue), so then
    the verdict is "unstable" when the interval lies above the band and "inconclusive"
    otherwise.

    Args:
        lam_max: the largest Ritz value.
        residual: its residual bound ``||H x - lambda_max x||`` (>= 0).
        lr: the learning rate ``eta``.
        converged: whether the eigenvalue run met its tolerance.
        momentum: heavy-ball momentum ``beta`` of the training optimizer (0: plain GD).

    Returns:
        Verdict (``low``/``high`` are the ends of the residual interval).

    Example:
        >>> gd_verdict(5.0, 1e-6, lr=0.1).status
        'stable'
        >>> gd_verdict(18.0, 3.0, lr=0.1).status  # 2/η = 20 lies in [15, 21]
        'inconclusive'
        >>> gd_verdict(5.0, 1e-6, lr=0.1, converged=False).status
        'inconclusive'
        >>> gd_verdict(30.0, 1e-6, lr=0.1, momentum=0.9).status  # (2 + 1.8)/0.1 = 38
        'stable'
    """
    threshold = (2.0 + 2.0 * momentum) / lr
    ratio = lam_max / threshold
    low, high = lam_max - residual, lam_max + residual
    bound = "2/η" if momentum == 0 else f"(2 + 2β)/η with β = {momentum:g}"
    numbers = (
        f"λmax = {lam_max:.4g} ± {residual:.2g} against {bound} = {threshold:.4g} "
        f"(ratio {ratio:.2f})"
    )
    status = _gd_status(low, high, threshold, converged)
    key = status if converged else f"{status}, not converged"
    text = _GD_TEXT[key].format(numbers=numbers, lr=lr, growth=abs(1 - lr * lam_max), low=low)
    reference = "Cohen et al. 2021, edge of stability"
    return Verdict(
        "GD", "lambda_max", lam_max, low, high, threshold, ratio, status, text, reference
    )


def _gd_status(low: float, high: float, threshold: float, converged: bool) -> str:
    """Where the interval ``[low, high]`` lies against ``threshold`` and its edge band."""
    band = ((1 - EDGE) * threshold, (1 + EDGE) * threshold)
    if low > band[1]:
        return "unstable"
    if not converged:
        return "inconclusive"
    if high < threshold:
        return "edge" if low >= band[0] else "stable"
    if low > threshold:
        return "edge" if high <= band[1] else "unstable"
    return "edge" if band[0] <= low and high <= band[1] else "inconclusive"


_GD_TEXT = {
    "stable": "Stable for gradient descent at η = {lr:.4g}: {numbers}.",
    "edge": "At the edge of stability: {numbers}; full-batch GD keeps the sharpness there.",
    "unstable": (
        "Unstable for full-batch gradient descent at η = {lr:.4g}: {numbers}; GD steps would "
        "grow along the top eigenvector by |1 - ηλmax| = {growth:.3g} each (mini-batch noise "
        "and non-quadratic terms can still keep SGD here)."
    ),
    "inconclusive": (
        "Inconclusive for gradient descent at η = {lr:.4g}: {numbers}; the uncertainty of λmax "
        "reaches across the threshold."
    ),
    "inconclusive, not converged": (
        "Inconclusive for gradient descent at η = {lr:.4g}: {numbers}, but the eigenvalue run "
        "did not converge, so λmax is only known to be at least {low:.4g}; rerun with a "
        "larger budget for a verdict."
    ),
    "unstable, not converged": (
        "Unstable for full-batch gradient descent at η = {lr:.4g}: {numbers}; the eigenvalue "
        "run did not converge, but λmax is at least {low:.4g}, already beyond the threshold."
    ),
}
"""Verdict texts by status (and, for an unconverged run, the two statuses it allows)."""


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
