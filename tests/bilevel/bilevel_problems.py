"""Quadratic bilevel problems with closed-form solutions, for the bilevel tests."""

from dataclasses import dataclass

import torch

D = torch.float64


@dataclass
class Quadratic:
    r"""``m`` quadratic blocks with a closed-form solution.

    :math:`g_i = \frac12 y^\top A_i y - y^\top(B_i x + c_i)` and
    :math:`f_i = \frac12\|y - t_i\|^2 + \frac\rho2\|x\|^2`, with :math:`A_i` the mean of
    ``Z_i``'s row outer products plus :math:`\mu I`, so mini-batches of rows are unbiased.
    """

    Z: torch.Tensor  # (m, n, p)
    B: torch.Tensor  # (m, p, q)
    c: torch.Tensor  # (m, p)
    t: torch.Tensor  # (m, p)
    mu: float
    rho: float

    @property
    def A(self) -> torch.Tensor:
        n, p = self.Z.shape[1:]
        return self.Z.transpose(1, 2) @ self.Z / n + self.mu * torch.eye(p, dtype=D)

    def upper(self, x, y, batch):
        i = batch
        return 0.5 * ((y - self.t[i]) ** 2).sum() + 0.5 * self.rho * (x**2).sum()

    def lower(self, x, y, batch):
        i, rows = batch
        Zr = self.Z[i] if rows is None else self.Z[i][rows]
        quad = 0.5 * ((Zr @ y) ** 2).mean() + 0.5 * self.mu * (y**2).sum()
        return quad - y @ (self.B[i] @ x + self.c[i])

    def data(self, batch_size: int | None):
        def sample(i, gen):
            if gen is None or batch_size is None:
                return i, (i, None)
            return i, (i, torch.randint(self.Z.shape[1], (batch_size,), generator=gen))

        return sample

    def y_star(self, x) -> torch.Tensor:
        return torch.linalg.solve(self.A, (self.B @ x + self.c)[..., None])[..., 0]

    def x_star(self) -> torch.Tensor:
        M = torch.linalg.solve(self.A, self.B)  # (m, p, q)
        r = self.t - torch.linalg.solve(self.A, self.c[..., None])[..., 0]
        q = self.B.shape[2]
        lhs = (M.transpose(1, 2) @ M).mean(0) + self.rho * torch.eye(q, dtype=D)
        rhs = (M.transpose(1, 2) @ r[..., None])[..., 0].mean(0)
        return torch.linalg.solve(lhs, rhs)


def quadratic(m=3, n=40, p=4, q=3, mu=0.5, rho=0.1, seed=0) -> Quadratic:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=D)  # noqa: E731
    return Quadratic(r(m, n, p), 0.5 * r(m, p, q), r(m, p), r(m, p), mu, rho)
