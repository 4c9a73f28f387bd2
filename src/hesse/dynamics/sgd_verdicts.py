"""Linear stability of SGD at its batch size, stated as plain-language verdicts.

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

from .verdicts import EDGE, Verdict


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
    text = _SGD_TEXT[status].format(B=B, lr=lr, numbers=numbers, sufficient=sufficient, edge=EDGE)
    text += _interpolation_note(loss)
    reference = "Wu, Ma & E 2018; Ma & Ying 2021; Wu & Su 2023"
    return Verdict(
        "SGD", "batch_moment", F, F_lo, F_hi, threshold, F / threshold, status, text, reference
    )


def _ratio(moment: float, trace: float) -> float:
    """``moment / trace``; infinite when the trace is not positive (no minimum: SGD leaves)."""
    return moment / trace if trace > 0 else math.inf


def _sgd_status(lam_low: float, F_lo: float, F_hi: float, S: float | None, thr: float) -> str:
    """Where the necessary and sufficient conditions of :func:`sgd_verdict` leave SGD.

    A λmax above 2/η by less than the edge band (``EDGE``) is "edge", as for GD: trained with
    that step, (S)GD settles there and hovers instead of leaving (Cohen et al. 2021), so the
    linear theory's "unstable" would contradict what training does.
    """
    if F_lo > thr or lam_low > (1 + EDGE) * thr:
        return "unstable"
    if lam_low > thr:
        return "edge"
    if S is not None and S <= thr:
        return "stable"
    return "inconclusive" if F_hi > thr else "indeterminate"


_SGD_TEXT = {
    "unstable": (
        "SGD with batches of {B} escapes this minimum at η = {lr:.4g}: {numbers}; a necessary "
        "condition of linear stability (λmax ≤ 2/η and E‖H_B‖²_F / Tr(H) ≤ 2/η) fails, so the "
        "second moment of the iterate grows."
    ),
    "edge": (
        "SGD with batches of {B} is at the edge of stability at η = {lr:.4g}: λmax lies above "
        "2/η by less than {edge:.0%} ({numbers}), where (S)GD trained with this step settles "
        "and oscillates (Cohen et al. 2021); the linear theory calls it unstable, training "
        "hovers here instead of leaving."
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
