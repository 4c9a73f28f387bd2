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

SGD with batches of ``B`` of ``n`` samples is linearly stable at an interpolating minimum
when the second moment of its linearization stays bounded (Wu, Ma & E 2018, "How SGD selects
the global minima in over-parameterized learning"; Ma & Ying 2021, "On linear stability of
SGD and input-smoothness of neural networks"; Wu & Su 2023, "The implicit regularization of
dynamical stability in stochastic gradient descent"); :func:`sgd_verdict` states the
batch-size-dependent conditions it checks.
"""

from __future__ import annotations

import math
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


@dataclass(frozen=True)
class BatchNoise:
    r"""What the SGD criterion measures besides the trace: the spread of per-sample Hessians.

    Attributes:
        batch_size: :math:`B`, samples per batch, drawn without replacement, :math:`1 \le B < n`.
        n_samples: :math:`n`.
        sharpness: ``(low, high)``, an interval holding :math:`\lambda_{\max}(H)`.
        frobenius: ``(value, low, high)``: :math:`\|H\|_F^2` and its 95% interval.
        sample_frobenius: ``(value, low, high)``: :math:`\frac1n \sum_i \|H_i\|_F^2` (the
            per-sample Hessians' second moment) and its 95% interval.
        sample_sharpness: an upper bound on :math:`\max_i \lambda_{\max}(H_i)` over every
            sample, or None when it was not measured.
    """

    batch_size: int
    n_samples: int
    sharpness: tuple[float, float]
    frobenius: tuple[float, float, float]
    sample_frobenius: tuple[float, float, float]
    sample_sharpness: float | None

    @property
    def gamma(self) -> float:
        r""":math:`\gamma_B = \frac{n - B}{B (n - 1)}`: a batch mean's variance over a sample's."""
        n, B = self.n_samples, self.batch_size
        return (n - B) / (B * (n - 1))

    def moment(self) -> tuple[float, float, float]:
        r"""``(value, low, high)`` of :math:`\mathbb E_B \|H_B\|_F^2`.

        .. math:: \mathbb E_B \|H_B\|_F^2 = (1 - \gamma_B)\|H\|_F^2
                  + \gamma_B \tfrac1n \textstyle\sum_i \|H_i\|_F^2
        """
        g, (f, f_lo, f_hi), (s, s_lo, s_hi) = self.gamma, self.frobenius, self.sample_frobenius
        return (1 - g) * f + g * s, (1 - g) * f_lo + g * s_lo, (1 - g) * f_hi + g * s_hi

    def sufficient(self) -> float | None:
        r"""Upper end of :math:`S_B` (None when the per-sample sharpness was not measured).

        .. math:: S_B = (1 - \gamma_B)\lambda_{\max}(H) + \gamma_B \max_i \lambda_{\max}(H_i)
        """
        if self.sample_sharpness is None:
            return None
        return (1 - self.gamma) * self.sharpness[1] + self.gamma * self.sample_sharpness


def sgd_verdict(
    trace: float,
    ci95: tuple[float, float],
    lr: float,
    loss: float,
    *,
    noise: BatchNoise | None = None,
) -> Verdict:
    r"""Plain SGD (no momentum) at an interpolating minimum, at its batch size.

    At a minimum where every sample's gradient vanishes, SGD linearizes to
    :math:`\theta \leftarrow (I - \eta H_B)\theta`, :math:`H_B` the mean of the per-sample
    Hessians :math:`H_i` of a batch of :math:`B` of the :math:`n` samples drawn without
    replacement. Its second moment :math:`S = \mathbb E[\theta\theta^\top]` evolves by

    .. math::
        \mathcal T(S) = \mathbb E_B[(I - \eta H_B) S (I - \eta H_B)]
        = (I - \eta H) S (I - \eta H)
          + \eta^2 \gamma_B \tfrac1n \textstyle\sum_i (H_i - H) S (H_i - H),
        \qquad \gamma_B = \frac{n - B}{B(n - 1)},

    and SGD stays near the minimum (in mean square) exactly when the spectral radius
    :math:`\rho(\mathcal T) \le 1` (Wu, Ma & E 2018; Ma & Ying 2021). :math:`\mathcal T` maps
    positive semi-definite matrices to such matrices and is self-adjoint for
    :math:`\langle X, Y\rangle = \mathrm{tr}(XY)`, which gives, with the measured quantities:

    - necessary: :math:`\rho \ge (1 - \eta\lambda_{\max})^2` and
      :math:`\rho \ge \langle I, \mathcal T(I)\rangle / \langle I, I\rangle`, so SGD escapes
      when :math:`\lambda_{\max}(H) > 2/\eta` or

      .. math:: F_B = \frac{\mathbb E_B \|H_B\|_F^2}{\mathrm{tr}\,H} > \frac{2}{\eta}, \qquad
                \mathbb E_B \|H_B\|_F^2 = (1 - \gamma_B)\|H\|_F^2
                  + \gamma_B \tfrac1n \textstyle\sum_i \|H_i\|_F^2;

    - sufficient, when every :math:`H_i \succeq 0`: :math:`\mathrm{tr}\,S` cannot grow when
      :math:`\mathbb E_B[(I - \eta H_B)^2] \preceq I`, which holds (as :math:`H^2 \preceq
      \lambda_{\max} H` and :math:`H_i^2 \preceq \lambda_{\max}(H_i) H_i`) when

      .. math:: S_B = (1 - \gamma_B)\,\lambda_{\max}(H)
                + \gamma_B \max_i \lambda_{\max}(H_i) \le \frac{2}{\eta}.

    At :math:`B = n` (:math:`\gamma_B = 0`) this is GD's :math:`\lambda_{\max} \le 2/\eta`. At
    :math:`B = 1` with rank-one :math:`H_i` (scalar output, squared loss)
    :math:`F_1 \ge \mathrm{tr}\,H`, so :math:`\mathrm{tr}\,H \le 2/\eta` is necessary: Wu & Su
    (2023)'s trace bound, which larger batches relax (with rank-``r`` :math:`H_i`,
    :math:`F_1 \ge \mathrm{tr}\,H / r`).

    The verdict is "unstable" when :math:`\lambda_{\max}` or :math:`F_B` exceeds
    :math:`2/\eta` with its whole interval, "stable" when :math:`S_B` (upper ends) does not,
    "inconclusive" when the interval of :math:`F_B` straddles :math:`2/\eta`, and
    "indeterminate" otherwise: the necessary conditions hold and the sufficient one fails (or
    was not measured), which the linear theory leaves open. Without ``noise`` (batch size
    unknown, as in the analysis report) it is "indeterminate", with what the trace implies at
    :math:`B = 1`. It assumes the minimum interpolates (zero loss for every sample) and, for
    "stable", positive semi-definite per-sample Hessians (the Gauss-Newton part, exact there);
    at a clearly positive loss the text says so.

    Args:
        trace: :math:`\mathrm{tr}\,H` (estimate).
        ci95: its 95% interval.
        lr: the learning rate :math:`\eta`.
        loss: the mean loss at the weights.
        noise: the batch size and the per-sample spread (:class:`BatchNoise`); None when the
            batch size is unknown.

    Returns:
        Verdict: with ``noise``, of the quantity ``"batch_moment"`` (:math:`F_B` and its
        interval); without, of ``"trace"``.

    Example:
        >>> sgd_verdict(50.0, (45.0, 55.0), lr=0.1, loss=0.0).status  # batch size unknown
        'indeterminate'
        >>> noise = BatchNoise(1, 16, (0.5, 0.5), (2.0, 2.0, 2.0), (16.0, 15.0, 17.0), 6.8)
        >>> sgd_verdict(4.0, (3.9, 4.1), lr=0.9, loss=0.0, noise=noise).status  # F_1 = 4 > 2.2
        'unstable'
    """
    threshold, (lo, hi) = 2.0 / lr, ci95
    if noise is None:
        return _unknown_batch(trace, lo, hi, lr, loss)
    m, m_lo, m_hi = noise.moment()
    F, F_lo, F_hi = _ratio(m, trace), _ratio(m_lo, hi), _ratio(m_hi, lo)
    S, B = noise.sufficient(), noise.batch_size
    numbers = (
        f"E‖H_B‖²_F / Tr(H) = {F:.4g} (95% CI {F_lo:.4g} – {F_hi:.4g}), λmax ≤ "
        f"{noise.sharpness[1]:.4g}, against 2/η = {threshold:.4g}, with γ_B = "
        f"(n − B)/(B(n − 1)) = {noise.gamma:.3g} for B = {B} of n = {noise.n_samples}"
    )
    status = _sgd_status(noise.sharpness[0], F_lo, F_hi, S, threshold)
    sufficient = (
        "max_i λmax(H_i), which the sufficient condition needs, was not measured"
        if S is None
        else f"(1 − γ_B)λmax + γ_B max_i λmax(H_i) = {S:.4g} {'≤' if S <= threshold else '>'} 2/η"
    )
    text = _SGD_TEXT[status].format(B=B, lr=lr, numbers=numbers, sufficient=sufficient)
    text += _interpolation_note(loss)
    reference = "Wu, Ma & E 2018; Ma & Ying 2021; Wu & Su 2023"
    return Verdict(
        "SGD", "batch_moment", F, F_lo, F_hi, threshold, F / threshold, status, text, reference
    )


def _ratio(moment: float, trace: float) -> float:
    """``moment / trace``; infinite when the trace is not positive (no minimum: SGD leaves)."""
    return moment / trace if trace > 0 else math.inf


def _sgd_status(lam_low: float, F_lo: float, F_hi: float, S: float | None, thr: float) -> str:
    """Where the necessary and sufficient conditions of :func:`sgd_verdict` leave SGD."""
    if lam_low > thr or F_lo > thr:
        return "unstable"
    if S is not None and S <= thr:
        return "stable"
    return "inconclusive" if F_hi > thr else "indeterminate"


_SGD_TEXT = {
    "unstable": (
        "SGD with batches of {B} escapes this minimum at η = {lr:.4g}: {numbers}; a necessary "
        "condition of linear stability (λmax ≤ 2/η and E‖H_B‖²_F / Tr(H) ≤ 2/η) fails, so the "
        "second moment of the iterate grows."
    ),
    "stable": (
        "SGD with batches of {B} is linearly stable at η = {lr:.4g}: {sufficient}, which "
        "suffices; {numbers}."
    ),
    "inconclusive": (
        "Inconclusive for SGD with batches of {B} at η = {lr:.4g}: {numbers}; the interval of "
        "the necessary condition straddles 2/η, and the sufficient one does not settle it "
        "({sufficient})."
    ),
    "indeterminate": (
        "Indeterminate for SGD with batches of {B} at η = {lr:.4g}: the necessary conditions "
        "hold ({numbers}), but not the sufficient one ({sufficient}); the linear theory leaves "
        "this batch size open."
    ),
}
"""SGD verdict texts by status."""


def _unknown_batch(trace: float, lo: float, hi: float, lr: float, loss: float) -> Verdict:
    """The SGD verdict without a batch size: what the trace says at ``B = 1``, no claim."""
    threshold = 2.0 / lr
    numbers = f"Tr(H) = {trace:.4g} (95% CI {lo:.4g} – {hi:.4g}) against 2/η = {threshold:.4g}"
    if lo > threshold:
        at_one = "so SGD with single-sample batches would escape it"
    elif hi < threshold:
        at_one = "which that bound allows"
    else:
        at_one = "whose interval straddles that bound"
    text = (
        f"Indeterminate for SGD at η = {lr:.4g}: its linear stability depends on the batch "
        f"size, which is not known here. {numbers}: with batches of one sample and rank-one "
        f"per-sample Hessians (a scalar output and the squared loss) Tr(H) ≤ 2/η is necessary, "
        f"{at_one}; larger batches tolerate more. hesse.dynamics.stability(objective, lr, "
        "batch_size=B) gives the verdict at B."
    ) + _interpolation_note(loss)
    reference = "Wu & Su 2023; Wu, Ma & E 2018"
    return Verdict(
        "SGD", "trace", trace, lo, hi, threshold, trace / threshold, "indeterminate", text,
        reference,
    )  # fmt: skip


def _interpolation_note(loss: float) -> str:
    """A warning when the weights are clearly not at an interpolating minimum."""
    if loss <= 0.05:
        return ""
    return (
        f" The criterion is derived at a global minimum (loss ~ 0); at the loss {loss:.3g} "
        "read it as an indication."
    )
