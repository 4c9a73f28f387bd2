"""Linear stability at the training learning rate, stated as plain-language verdicts.

Gradient descent with step ``eta`` is linearly stable at a minimum only when the sharpness
``lambda_max <= 2/eta``; trained with GD, networks drift to ``lambda_max ~ 2/eta`` and stay
there (Cohen et al. 2021, "Gradient descent on neural networks typically occurs at the edge
of stability"). With heavy-ball momentum ``beta`` the threshold is ``(2 + 2 beta)/eta``, with
Nesterov momentum ``(2 + 2 beta)/((1 + 2 beta) eta)``. For Adam the quantity that settles at
its threshold ``(2 + 2 beta1)/((1 - beta1) eta)`` is the preconditioned sharpness
``lambda_max(P^-1 H)`` (Cohen et al. 2022, "Adaptive gradient methods at the edge of
stability"), which needs the optimizer's second-moment state, so plain ``lambda_max(H)`` gets
no Adam verdict.
SGD's verdicts, which depend on the batch size, are in :mod:`hesse.dynamics.sgd_verdicts`.
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
        quantity: ``"lambda_max"``, ``"trace"`` (SGD, batch size unknown) or
            ``"batch_moment"`` (SGD at a batch size: ``E_B ||H_B||_F^2 / Tr(H)``).
        value: the measured quantity.
        low: lower end of its uncertainty (residual bound or 95% CI).
        high: upper end.
        threshold: what ``value`` is held against (``2/lr``, or the momentum threshold).
        ratio: ``value / threshold``.
        status: ``"stable"``, ``"edge"``, ``"unstable"``, ``"inconclusive"`` (the uncertainty
            of the measurement reaches across the threshold) or ``"indeterminate"`` (SGD: a
            necessary condition holds and a sufficient one fails, or the batch size is unknown).
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


def gd_threshold(lr: float, momentum: float = 0.0, *, nesterov: bool = False) -> float:
    r"""The largest sharpness at which (S)GD with step ``lr`` is linearly stable on a quadratic.

    On :math:`\tfrac12 \lambda \theta^2`, heavy ball (PyTorch's ``SGD(momentum=β)``:
    :math:`v \leftarrow \beta v + g`, :math:`\theta \leftarrow \theta - \eta v`) has the
    characteristic polynomial :math:`z^2 - (1 + \beta - \eta\lambda) z + \beta`, and Nesterov
    (``SGD(momentum=β, nesterov=True)``: :math:`\theta \leftarrow \theta - \eta (g + \beta v)`)
    has :math:`z^2 - (1 + \beta)(1 - \eta\lambda) z + \beta (1 - \eta\lambda)`; a root leaves
    the unit disk through :math:`z = -1` at

    .. math::
        \lambda = \frac{2 + 2\beta}{\eta} \;\text{(heavy ball)}, \qquad
        \lambda = \frac{2 + 2\beta}{(1 + 2\beta)\,\eta} \;\text{(Nesterov)},

    both :math:`2/\eta` at :math:`\beta = 0`. Nesterov's look-ahead gradient tolerates far less
    sharpness than heavy ball: 1.357 against 3.8 at :math:`\eta = 1, \beta = 0.9`.

    Args:
        lr: the step size :math:`\eta > 0`.
        momentum: :math:`\beta \in [0, 1)`.
        nesterov: Nesterov momentum instead of heavy ball.

    Example:
        >>> gd_threshold(0.1), round(gd_threshold(0.1, 0.9), 9)
        (20.0, 38.0)
        >>> round(gd_threshold(1.0, 0.9, nesterov=True), 4)
        1.3571
    """
    heavy_ball = (2.0 + 2.0 * momentum) / lr
    return heavy_ball / (1.0 + 2.0 * momentum) if nesterov else heavy_ball


def gd_verdict(
    lam_max: float,
    residual: float,
    lr: float,
    *,
    converged: bool = True,
    momentum: float = 0.0,
    nesterov: bool = False,
) -> Verdict:
    """Full-batch gradient descent: ``lambda_max`` against ``2/lr``, with its uncertainty.

    With momentum ``beta`` the threshold is :func:`gd_threshold`: ``(2 + 2 beta)/lr`` for heavy
    ball, ``(2 + 2 beta)/((1 + 2 beta) lr)`` for Nesterov.

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
        momentum: momentum ``beta`` of the training optimizer (0: plain GD).
        nesterov: Nesterov momentum instead of heavy ball.

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
        >>> gd_verdict(30.0, 1e-6, lr=0.1, momentum=0.9, nesterov=True).status  # 38/2.8 = 13.6
        'unstable'
    """
    threshold = gd_threshold(lr, momentum, nesterov=nesterov)
    ratio = lam_max / threshold
    low, high = lam_max - residual, lam_max + residual
    numbers = (
        f"λmax = {lam_max:.4g} ± {residual:.2g} against {_bound(momentum, nesterov)} = "
        f"{threshold:.4g} (ratio {ratio:.2f})"
    )
    status = _gd_status(low, high, threshold, converged)
    key = status if converged else f"{status}, not converged"
    text = _GD_TEXT[key].format(numbers=numbers, lr=lr, low=low)
    reference = "Cohen et al. 2021, edge of stability"
    return Verdict(
        "GD", "lambda_max", lam_max, low, high, threshold, ratio, status, text, reference
    )


def _bound(momentum: float, nesterov: bool) -> str:
    """The threshold's formula, in words of the verdict texts."""
    if momentum == 0:
        return "2/η"
    if nesterov:
        return f"(2 + 2β)/((1 + 2β)η) with Nesterov β = {momentum:g}"
    return f"(2 + 2β)/η with β = {momentum:g}"


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
        "Unstable for full-batch gradient descent at η = {lr:.4g}: {numbers}; steps along the "
        "top eigenvector grow (only non-quadratic terms of the loss can hold the iterate near "
        "here; mini-batch noise makes the linear recursion less stable, not more)."
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
