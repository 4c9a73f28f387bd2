r"""The damped empirical Fisher of a window of gradients, with exact inverse products (M-FAC).

.. math::
    F = \lambda I + \frac{1}{m} G^\top G, \qquad
    F^{-1} = \frac{1}{\lambda}\Big(I - G^\top (m\lambda I + G G^\top)^{-1} G\Big)

for ``m`` gradients stacked as the rows of ``G`` (m, d). Products with ``F`` and with
``F^{-1}`` (the Sherman-Morrison-Woodbury identity) cost ``O(m d)``; the ``m x m`` Gram
matrix ``K = G G^T`` is kept up to date in ``O(m d)`` per new gradient and factorized in
float64. Nothing of size ``d x d`` is ever formed.

Reference: Frantar, Kurtic, Alistarh (2021), "M-FAC: Efficient Matrix-Free Approximations of
Second-Order Information", section 3 (the Woodbury form of the inverse empirical Fisher and its
sliding-window update); Singh & Alistarh (2020), "WoodFisher".
"""

from __future__ import annotations

import torch

from .base import PSD, SYMMETRIC, Operator


class WoodburyFisher(Operator):
    r"""``F = damping * I + G^T G / m``: the damped empirical Fisher of ``m`` gradients.

    The gradients are a sliding window of at most ``window`` rows: :meth:`update` appends
    one, dropping the oldest once the window is full. ``m`` is the number held now (the
    operator is ``damping * I`` while it holds none).

    Args:
        grads: ``(m, d)`` gradients (per sample or per mini-batch), or ``(0, d)``.
        damping: :math:`\lambda > 0`, absolute (the caller scales it, e.g. by the mean of
            :meth:`diag`).
        window: Most gradients held (default: ``m``, at least 1).
        space: Parameter layout of the rows (a ``ParamSpace``), for ``restrict``-free naming.

    Raises:
        ValueError: ``grads`` not 2-D, damping not positive and finite, non-finite gradients,
            ``window`` smaller than ``m``.

    Example:
        >>> g = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        >>> F = WoodburyFisher(g, damping=0.1)
        >>> dense = 0.1 * torch.eye(10, dtype=torch.float64) + g.T @ g / 4
        >>> v = torch.ones(10, dtype=torch.float64)
        >>> bool(torch.allclose(F.inverse() @ v, torch.linalg.solve(dense, v)))
        True
    """

    def __init__(
        self, grads: torch.Tensor, damping: float, *, window: int | None = None, space=None
    ):
        if grads.dim() != 2:
            raise ValueError(
                f"WoodburyFisher: grads must be (m, d), one gradient per row; got shape "
                f"{tuple(grads.shape)}. Stack them with torch.stack(list_of_flat_grads)."
            )
        damping = float(damping)
        if not damping > 0 or damping == float("inf"):
            raise ValueError(
                f"WoodburyFisher: damping must be positive and finite, got {damping}; F without "
                "damping is singular whenever m < d. Pass e.g. damping=1e-4 * mean(F.diag())."
            )
        m, d = grads.shape
        window = max(m, 1) if window is None else int(window)
        if window < max(m, 1):
            raise ValueError(
                f"WoodburyFisher: window={window} is smaller than the {m} gradients given; "
                f"pass window >= {m} or fewer gradients."
            )
        _check_finite(grads, "grads")
        super().__init__(d, grads.dtype, grads.device, tags=(SYMMETRIC, PSD), space=space)
        self.damping, self.window = damping, window
        self._G = grads.detach().clone()
        self._K = self._G.to(torch.float64) @ self._G.to(torch.float64).T
        self._factor = None

    @property
    def m(self) -> int:
        """Number of gradients held."""
        return self._G.shape[0]

    @property
    def grads(self) -> torch.Tensor:
        """The ``(m, d)`` gradients held, oldest first (a view; do not modify)."""
        return self._G

    def update(self, g: torch.Tensor) -> WoodburyFisher:
        """Append the flat gradient ``g`` (d,), dropping the oldest if ``window`` are held.

        Costs ``O(m d)`` (one new row and column of the Gram matrix). Returns ``self``.
        """
        d = self.shape[0]
        if g.shape != (d,):
            raise ValueError(
                f"WoodburyFisher.update: expected one flat gradient of shape ({d},), got "
                f"{tuple(g.shape)}."
            )
        _check_finite(g, "update(g)")
        g = g.detach().to(self.dtype, copy=True)
        keep = slice(1, None) if self.m == self.window else slice(None)
        G, K = self._G[keep], self._K[keep, keep]
        row = G.to(torch.float64) @ g.to(torch.float64)
        corner = (g.to(torch.float64) @ g.to(torch.float64)).reshape(1, 1)
        self._K = torch.cat([torch.cat([K, row[:, None]], 1), torch.cat([row[None], corner], 1)])
        self._G = torch.cat([G, g[None]])
        self._factor = None
        return self

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if self.m == 0:
            return self.damping * V
        return self.damping * V + self._G.T @ (self._G @ V) / self.m

    def diag(self) -> torch.Tensor:
        """The diagonal of ``F``: ``damping + (1/m) sum_j G_jq^2``, shape ``(d,)``."""
        if self.m == 0:
            return torch.full((self.shape[0],), self.damping, dtype=self.dtype, device=self.device)
        return self.damping + (self._G**2).sum(0) / self.m

    def inverse_diag(self) -> torch.Tensor:
        r"""The diagonal of ``F^{-1}`` (for OBS/M-FAC saliencies ``w^2 / (2 [F^{-1}]_{qq})``).

        :math:`[F^{-1}]_{qq} = \frac{1}{\lambda}(1 - \sum_a W_{aq}^2)` with
        :math:`W = L^{-1} G`, :math:`L L^\top = m\lambda I + G G^\top`. Costs ``O(m^2 d)``.
        """
        if self.m == 0:
            return torch.full(
                (self.shape[0],), 1 / self.damping, dtype=self.dtype, device=self.device
            )
        W = torch.linalg.solve_triangular(self._cholesky(), self._G.to(torch.float64), upper=False)
        return ((1 - (W**2).sum(0)) / self.damping).to(self.dtype)

    def inverse(self, damping: float = 0.0, **options) -> Operator:
        """``F^{-1}`` exactly, by the Woodbury identity (``O(m d)`` per product).

        ``damping`` adds to this operator's own damping (``(F + damping I)^{-1}``); the
        iterative-solver ``options`` of :meth:`Operator.inverse` do not apply and are refused.
        """
        if options:
            raise ValueError(
                f"WoodburyFisher.inverse: the inverse is exact (Woodbury); solver options "
                f"{sorted(options)} do not apply. Call .inverse() or .inverse(damping)."
            )
        F = self if damping == 0 else self._with_damping(self.damping + float(damping))
        return _WoodburyInverse(F)

    def _with_damping(self, damping: float) -> WoodburyFisher:
        F = WoodburyFisher(self._G[:0], damping, window=self.window, space=self.space)
        F._G, F._K = self._G, self._K
        return F

    def _cholesky(self) -> torch.Tensor:
        if self._factor is None:
            eye = torch.eye(self.m, dtype=torch.float64, device=self.device)
            self._factor = torch.linalg.cholesky(self.m * self.damping * eye + self._K)
        return self._factor

    def _solve(self, V: torch.Tensor) -> torch.Tensor:
        """``F^{-1} V`` for ``V`` (d, k)."""
        if self.m == 0:
            return V / self.damping
        G = self._G.to(torch.float64)
        inner = torch.cholesky_solve(G @ V.to(torch.float64), self._cholesky())
        return ((V.to(torch.float64) - G.T @ inner) / self.damping).to(V.dtype)

    def __repr__(self) -> str:
        return (
            f"WoodburyFisher(d={self.shape[0]}, m={self.m}, window={self.window}, "
            f"damping={self.damping:.3g}, dtype={self.dtype})"
        )


class _WoodburyInverse(Operator):
    """``F^{-1}`` of a :class:`WoodburyFisher`, exact; symmetric positive definite."""

    def __init__(self, fisher: WoodburyFisher):
        d = fisher.shape[0]
        super().__init__(d, fisher.dtype, fisher.device, tags=(SYMMETRIC, PSD), space=fisher.space)
        self.fisher = fisher

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.fisher._solve(V)

    def diag(self) -> torch.Tensor:
        """The diagonal of ``F^{-1}``, shape ``(d,)``."""
        return self.fisher.inverse_diag()


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        rows = (~torch.isfinite(t)).reshape(t.shape[0], -1).any(1).nonzero().flatten().tolist()
        where = f" (rows {rows[:5]})" if t.dim() == 2 else ""
        raise ValueError(f"WoodburyFisher: {what} has non-finite entries{where}.")
