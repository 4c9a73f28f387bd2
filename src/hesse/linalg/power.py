"""Power iteration with deflation, kept for parity with PyHessian."""

from __future__ import annotations

from typing import Any

import torch

from ._lanczos import F64, basis_dtype
from ._util import Counted, as_operator, gaussian, generator, require_symmetric
from .eigs import EigResult


def power_iteration(
    A: Any, k: int = 1, *, tol: float = 1e-3, max_matvecs: int | None = None, seed: int = 0
) -> EigResult:
    r"""Top-``k`` eigenpairs by power iteration with deflation, as PyHessian computes them.

    Each eigenpair iterates :math:`v \leftarrow Av/\|Av\|` (``v`` kept orthogonal to the pairs
    already found) until the Rayleigh quotient changes by less than ``tol`` relative; kept for
    parity with PyHessian (Yao et al. 2020). The iterate, its dot products and norms are
    float64; only the products run in the operator's dtype. It converges slowly when
    eigenvalues are close and finds the largest in magnitude; prefer :func:`eigs`.

    Args:
        A: Symmetric operator ``(d, d)`` (any input :func:`eigs` takes).
        k: Number of eigenpairs.
        tol: Relative change of the Rayleigh quotient that stops an eigenpair.
        max_matvecs: Budget for all pairs; default ``100 k``.
        seed: Seed of the start vectors.

    Returns:
        EigResult with ``which="magnitude"``; residuals are ``||A v - theta v||`` (plus the
        products' error per unit input for approximate products, ``product_error``).
    """
    A = as_operator(A)
    require_symmetric(A, "power_iteration")
    op, gen = Counted(A), generator(seed)
    budget = max_matvecs or 100 * k
    if budget < 2 * k:
        raise ValueError(f"power_iteration: max_matvecs={budget} is below 2 per eigenpair (k={k}).")
    dtype = basis_dtype(op.device)
    X = torch.zeros(op.d, 0, dtype=dtype, device=op.device)
    vals, res, ok = [], [], True
    for i in range(k):
        w, theta, done = gaussian(gen, op.d, 1, op, dtype), None, False
        while op.n < budget * (i + 1) // k and not done:
            v = w - X @ op.dot(X, w)
            v = v / op.norm(v)
            Av = op(v).to(dtype)
            new = float(op.total((v * Av).sum()))
            r = float(op.norm(Av - new * v))
            done = theta is not None and abs(theta - new) / (abs(theta) + 1e-6) < tol
            theta, w = new, Av
        ok = ok and done
        X = torch.cat([X, v], 1)  # the vector whose Rayleigh quotient and residual are reported
        vals.append(theta)
        res.append(r)
    vectors = X.to(torch.promote_types(op.dtype, torch.float32))
    reason = "" if ok else f"budget of {budget} products spent before the Rayleigh quotient settled"
    # approximate products (finite differences) are op.error off per unit input
    values, residuals = torch.tensor(vals, dtype=F64), torch.tensor(res, dtype=F64) + op.error
    return EigResult(values, vectors, residuals, ok, op.n, "magnitude", reason)
