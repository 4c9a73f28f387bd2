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

CHUNK = 1 << 16
"""Columns converted to float64 at a time for the Gram matrix and the inverse diagonal."""


class WoodburyFisher(Operator):
    r"""``F = damping * I + G^T G / m``: the damped empirical Fisher of ``m`` gradients.

    The gradients are a sliding window of at most ``window`` rows: :meth:`update` appends
    one, dropping the oldest once the window is full. ``m`` is the number held now (the
    operator is ``damping * I`` while it holds none).

    Args:
        grads: ``(m, d)`` gradients (per sample or per mini-batch), or ``(0, d)``.
        damping: :math:`\lambda > 0`, absolute (default 1e-5, M-FAC's; scale it to the
            gradients, e.g. by the mean of :meth:`diag`).
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
        self, grads: torch.Tensor, damping: float = 1e-5, *, window: int | None = None, space=None
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
        # A ring buffer: row ``_head`` is the oldest once the window is full. Products and the
        # Gram matrix K = G G^T use the rows in buffer order (a sum over rows does not care).
        self._buf = grads.new_zeros((window, d))
        self._buf[:m] = grads.detach()
        self._count, self._head = m, 0
        self._K = torch.zeros(window, window, dtype=torch.float64, device=grads.device)
        self._K[:m, :m] = _gram(self._buf[:m], self._buf[:m])
        self._factor: tuple[float, torch.Tensor] | None = None  # (lam, Cholesky factor)

    @property
    def m(self) -> int:
        """Number of gradients held."""
        return self._count

    @property
    def grads(self) -> torch.Tensor:
        """The ``(m, d)`` gradients held, oldest first (a copy once the window has wrapped)."""
        G = self._buf[: self._count]
        return G if self._head == 0 else torch.cat([G[self._head :], G[: self._head]])

    def update(self, g: torch.Tensor) -> WoodburyFisher:
        """Append the flat gradient ``g`` (d,), dropping the oldest if ``window`` are held.

        Costs ``O(m d)``: one row of the buffer and one row and column of the Gram matrix
        are overwritten in place. Returns ``self``.
        """
        d = self.shape[0]
        if g.shape != (d,):
            raise ValueError(
                f"WoodburyFisher.update: expected one flat gradient of shape ({d},), got "
                f"{tuple(g.shape)}."
            )
        _check_finite(g, "update(g)")
        if self._count < self.window:
            row, self._count = self._count, self._count + 1
        else:
            row, self._head = self._head, (self._head + 1) % self.window
        self._buf[row] = g.detach()
        k = _gram(self._buf[row : row + 1], self._buf[: self._count])[0]
        self._K[row, : self._count] = k
        self._K[: self._count, row] = k
        self._factor = None
        return self

    def state_dict(self) -> dict:
        """Everything that determines the products, to the bit (for resuming a run)."""
        return {
            "buffer": self._buf.clone(), "gram": self._K.clone(), "count": self._count,
            "head": self._head, "damping": self.damping,
        }  # fmt: skip

    @classmethod
    def from_state_dict(cls, state: dict, *, space=None) -> WoodburyFisher:
        """The operator :meth:`state_dict` describes; its products equal the saved one's exactly."""
        buffer = state["buffer"]
        F = cls(buffer[:0], state["damping"], window=buffer.shape[0], space=space)
        F._buf, F._K = buffer.clone(), state["gram"].clone()
        F._count, F._head = int(state["count"]), int(state["head"])
        return F

    def _G(self) -> torch.Tensor:
        """The rows held, in buffer order."""
        return self._buf[: self._count]

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if self.m == 0:
            return self.damping * V
        G = self._G()
        return self.damping * V + G.T @ (G @ V) / self.m

    def diag(self) -> torch.Tensor:
        """The diagonal of ``F``: ``damping + (1/m) sum_j G_jq^2``, shape ``(d,)``."""
        if self.m == 0:
            return torch.full((self.shape[0],), self.damping, dtype=self.dtype, device=self.device)
        return self.damping + (self._G() ** 2).sum(0) / self.m

    def inverse_diag(self, extra: float = 0.0) -> torch.Tensor:
        r"""The diagonal of ``(F + extra I)^{-1}``, for saliencies ``w^2 / (2 [F^{-1}]_{qq})``.

        :math:`[F^{-1}]_{qq} = \frac{1}{\lambda}(1 - \sum_a W_{aq}^2)` with
        :math:`W = L^{-1} G`, :math:`L L^\top = m\lambda I + G G^\top`. Costs ``O(m^2 d)``,
        over column chunks (no float64 copy of ``G``).
        """
        lam = self.damping + extra
        out = torch.full((self.shape[0],), 1 / lam, dtype=self.dtype, device=self.device)
        if self.m == 0:
            return out
        L, G = self._cholesky(lam), self._G()
        for c in range(0, G.shape[1], CHUNK):
            W = torch.linalg.solve_triangular(L, G[:, c : c + CHUNK].to(torch.float64), upper=False)
            out[c : c + CHUNK] = ((1 - (W**2).sum(0)) / lam).to(self.dtype)
        return out

    def inverse(self, damping: float = 0.0, **options) -> Operator:
        """``(F + damping I)^{-1}`` exactly, by the Woodbury identity (``O(m d)`` per product).

        The inverse follows :meth:`update`: its products always use the gradients held now.
        The iterative-solver ``options`` of :meth:`Operator.inverse` do not apply and are
        refused.
        """
        if options:
            raise ValueError(
                f"WoodburyFisher.inverse: the inverse is exact (Woodbury); solver options "
                f"{sorted(options)} do not apply. Call .inverse() or .inverse(damping)."
            )
        if not damping >= 0:
            raise ValueError(f"WoodburyFisher.inverse: damping must be >= 0, got {damping}.")
        return _WoodburyInverse(self, float(damping))

    def _cholesky(self, lam: float) -> torch.Tensor:
        """Lower Cholesky factor of ``m lam I + G G^T`` (cached per ``lam`` until an update)."""
        if self._factor is None or self._factor[0] != lam:
            eye = torch.eye(self.m, dtype=torch.float64, device=self.device)
            K = self._K[: self.m, : self.m]
            self._factor = (lam, torch.linalg.cholesky(self.m * lam * eye + K))
        return self._factor[1]

    def _solve(self, V: torch.Tensor, extra: float = 0.0) -> torch.Tensor:
        """``(F + extra I)^{-1} V`` for ``V`` (d, k)."""
        lam = self.damping + extra
        if self.m == 0:
            return V / lam
        # G @ V and G^T @ inner run in G's dtype (a float64 copy of G would double the memory
        # and the time at d = 1e6); only the small m x m solve runs in float64.
        G = self._G()
        inner = torch.cholesky_solve((G @ V).to(torch.float64), self._cholesky(lam))
        return (V - G.T @ inner.to(G.dtype)) / lam

    def __repr__(self) -> str:
        return (
            f"WoodburyFisher(d={self.shape[0]}, m={self.m}, window={self.window}, "
            f"damping={self.damping:.3g}, dtype={self.dtype})"
        )


class _WoodburyInverse(Operator):
    """``(F + extra I)^{-1}`` of a :class:`WoodburyFisher`, exact; symmetric positive definite."""

    def __init__(self, fisher: WoodburyFisher, extra: float):
        d = fisher.shape[0]
        super().__init__(d, fisher.dtype, fisher.device, tags=(SYMMETRIC, PSD), space=fisher.space)
        self.fisher, self.extra = fisher, extra

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.fisher._solve(V, self.extra)

    def diag(self) -> torch.Tensor:
        """The diagonal of ``(F + extra I)^{-1}``, shape ``(d,)``."""
        return self.fisher.inverse_diag(self.extra)


def _gram(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A @ B.T`` in float64, over column chunks (no float64 copy of a whole ``(m, d)``).

    The Gram matrix must be accurate far below float32's round-off: ``m * damping`` is often
    1e-8 of its diagonal, and a float32 Gram matrix would not be positive definite.
    """
    out = torch.zeros(A.shape[0], B.shape[0], dtype=torch.float64, device=A.device)
    for c in range(0, A.shape[1], CHUNK):
        out += A[:, c : c + CHUNK].to(torch.float64) @ B[:, c : c + CHUNK].to(torch.float64).T
    return out


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        rows = (~torch.isfinite(t)).reshape(t.shape[0], -1).any(1).nonzero().flatten().tolist()
        where = f" (rows {rows[:5]})" if t.dim() == 2 else ""
        raise ValueError(f"WoodburyFisher: {what} has non-finite entries{where}.")
