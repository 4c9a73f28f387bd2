"""The damped inverse Cholesky factor that OBS column sweeps (GPTQ, SparseGPT, OBC) run on."""

from __future__ import annotations

import torch

_RAISES = 12


def inverse_cholesky(
    H: torch.Tensor, damping: float, live: torch.Tensor, who: str
) -> tuple[torch.Tensor, float, float, int]:
    r"""Upper Cholesky factor of :math:`(H + \lambda I)^{-1}`, raising the damping until PD.

    :math:`\lambda = \rho \cdot \mathrm{mean}\,\mathrm{diag}\,H` with :math:`\rho` = ``damping``,
    multiplied by 10 while the Cholesky factorization fails. An always-zero input
    (``live[q]`` False) gets :math:`H_{qq} = 1` first (the rule of GPTQ and SparseGPT): its row
    and column of :math:`U` are then those of the identity, so no update reaches its weights or
    leaves them (Frantar et al. 2023, Algorithm 1).

    Args:
        H: ``(d, d)`` symmetric PSD input Hessian (not modified).
        damping: :math:`\rho > 0`, relative to the mean diagonal.
        live: ``(d,)`` bool, inputs that were ever non-zero.
        who: The caller's name, for errors.

    Returns:
        ``(U, lambda, rho, raised)``: the factor, the absolute and relative damping used, and
        how many times it was raised.

    Raises:
        ValueError: ``damping <= 0``.
        RuntimeError: still not positive definite after raising the damping 12 times.
    """
    if not damping > 0:
        raise ValueError(f"{who}: damping must be > 0, got {damping}; 0.01 is typical.")
    H = H.clone()
    H.diagonal()[~live] = 1.0
    scale = float(H.diagonal().mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    rho = damping
    for raised in range(_RAISES):
        L, info = torch.linalg.cholesky_ex(H + rho * scale * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                return U, rho * scale, rho, raised
        rho *= 10
    raise RuntimeError(
        f"{who}: H + damping up to {rho / 10:.3g} x mean(diag H) is not positive definite; "
        "check H for non-finite entries."
    )
