r"""The updates of the optimizers as small pure functions of tensors and hyper-parameters.

Each takes one parameter, its gradient, the new Hessian-diagonal estimate (None on steps
without one) and its state (a dict of tensors and counts), and returns the new parameter and
the new state; nothing is modified in place. The ``torch.optim.Optimizer`` classes are thin
shells that call them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def adahessian_update(
    p: torch.Tensor,
    g: torch.Tensor,
    d: torch.Tensor | None,
    state: dict,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    hessian_power: float,
) -> tuple[torch.Tensor, dict]:
    r"""One AdaHessian step (Yao et al. 2021, Algorithm 1).

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
        v_s = \beta_2 v_{s-1} + (1-\beta_2) \bar D_s^2, \\
        \theta_{t+1} = \theta_t - \eta\Big(\frac{m_t / (1-\beta_1^t)}
        {(\sqrt{v_s / (1-\beta_2^s)})^k + \epsilon} + \lambda \theta_t\Big)

    where :math:`\bar D_s` is the ``s``-th (spatially averaged) diagonal estimate: with
    ``update_every > 1`` the second moment advances only when a new estimate arrives, and its
    bias correction counts estimates, not steps. :math:`k` is ``hessian_power``; the weight
    decay :math:`\lambda` is decoupled, as in the official code.

    Args:
        p: Parameter.
        g: Its gradient.
        d: The new averaged diagonal estimate :math:`\bar D_s`, or None.
        state: ``{"step", "exp_avg", "estimates", "exp_hessian_sq"}`` (empty at first).
        lr, betas, eps, weight_decay, hessian_power: Hyper-parameters (see above).

    Returns:
        ``(new_p, new_state)``.
    """
    b1, b2 = betas
    t = state.get("step", 0) + 1
    s = state.get("estimates", 0)
    m = b1 * state.get("exp_avg", torch.zeros_like(p)) + (1 - b1) * g
    v = state.get("exp_hessian_sq", torch.zeros_like(p))
    if d is not None:
        s, v = s + 1, b2 * v + (1 - b2) * d * d
    if s == 0:
        raise ValueError(
            "adahessian_update: no Hessian-diagonal estimate yet; the first step with a gradient "
            "must bring one. With update_every > 1, a parameter whose first gradient comes "
            "between two refreshes has none: give it a gradient on step 0, or use update_every=1."
        )
    denom = (v / (1 - b2**s)).sqrt() ** hessian_power + eps
    new_p = p - lr * (m / (1 - b1**t) / denom + weight_decay * p)
    return new_p, {"step": t, "exp_avg": m, "estimates": s, "exp_hessian_sq": v}


def sophia_update(
    p: torch.Tensor,
    g: torch.Tensor,
    h_hat: torch.Tensor | None,
    state: dict,
    *,
    lr: float,
    betas: tuple[float, float],
    rho: float,
    weight_decay: float,
    eps: float,
) -> tuple[torch.Tensor, dict]:
    r"""One Sophia step (Liu et al. 2024, Algorithm 3), with the clip the paper states.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
        h_t = \beta_2 h_{t-k} + (1-\beta_2) \hat h_t \ \text{(every } k \text{ steps)}, \\
        \theta_{t+1} = (1 - \eta\lambda)\theta_t
        - \eta\, \mathrm{sign}(m_t)\, \min\Big(\frac{|m_t|}{\max(\rho h_t, \epsilon)}, 1\Big)

    So every coordinate moves by at most :math:`\eta` (plus the decay :math:`\eta\lambda
    |\theta|`), and where :math:`h_t \le 0` the step is the sign step :math:`\eta\,
    \mathrm{sign}(m_t)`. The official SophiaG code divides by :math:`\rho h_t + 10^{-15}`
    instead, so a negative :math:`h_t` (which a Hutchinson estimate can give) makes the ratio
    negative, escapes the ``clamp(max=1)`` and steps uphill.

    Args:
        p: Parameter.
        g: Its gradient.
        h_hat: The new diagonal estimate :math:`\hat h_t`, or None between refreshes.
        state: ``{"step", "exp_avg", "hessian"}`` (empty at first).
        lr, betas, rho, weight_decay, eps: Hyper-parameters (see above).

    Returns:
        ``(new_p, new_state)``.
    """
    b1, b2 = betas
    m = b1 * state.get("exp_avg", torch.zeros_like(p)) + (1 - b1) * g
    h = state.get("hessian", torch.zeros_like(p))
    if h_hat is not None:
        h = b2 * h + (1 - b2) * h_hat
    ratio = (m.abs() / (rho * h).clamp(min=eps)).clamp(max=1)
    new_p = p * (1 - lr * weight_decay) - lr * m.sign() * ratio
    return new_p, {"step": state.get("step", 0) + 1, "exp_avg": m, "hessian": h}


def sam_perturbation(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    rhos: Sequence[float],
    *,
    adaptive: bool,
) -> list[torch.Tensor]:
    r"""SAM's ascent step :math:`\epsilon`, or ASAM's when ``adaptive``.

    .. math::
        \epsilon = \rho\, \frac{T^2 g}{\|T g\|_2}, \qquad
        T = \mathrm{diag}(|\theta|) \text{ (ASAM) or } I \text{ (SAM)}

    so that :math:`\|T^{-1}\epsilon\|_2 = \rho`: the ascent has norm :math:`\rho` (SAM), or
    norm :math:`\rho` measured relative to the weights (ASAM), which makes ASAM's perturbed
    loss invariant to rescalings of the weights that leave the function unchanged. The norm
    is over all parameters together; ``rhos`` gives each parameter's :math:`\rho` (its
    group's). References: Foret, Kleiner, Mobahi & Neyshabur (2021), "Sharpness-Aware
    Minimization for Efficiently Improving Generalization"; Kwon, Kim, Park & Choi (2021),
    "ASAM: Adaptive Sharpness-Aware Minimization" (as in davda54/sam, without ASAM's
    :math:`\eta` offset).

    Args:
        params: Parameters.
        grads: Their gradients.
        rhos: :math:`\rho` per parameter.
        adaptive: ASAM's :math:`T = |\theta|`.

    Returns:
        :math:`\epsilon` per parameter.
    """
    T = [p.detach().abs() if adaptive else torch.ones_like(p) for p in params]
    norm = math.sqrt(
        sum(float((t * g).double().square().sum()) for t, g in zip(T, grads, strict=True))
    )
    return [r * t * t * g / (norm + 1e-12) for r, t, g in zip(rhos, T, grads, strict=True)]
