r"""The bilevel problem as the solvers see it: derivatives of :math:`f` and :math:`g`, counted.

A problem is two scalar functions of ``(x, y, batch)``: the upper level :math:`f` and the lower
level :math:`g`, with ``x`` the hyperparameters and ``y`` the parameters of one lower-level
block. With ``blocks=m`` the parameters are ``(m, *shape)``, block :math:`i` owns ``y[i]`` and
its own data, and :math:`F(x) = \frac1m \sum_i f(x, y_i^*(x), \xi_i)`. The data sampler
``data(i, generator)`` returns ``(upper_batch, lower_batch)`` for block ``i``: a random
mini-batch from ``generator``, or all of block ``i``'s data when ``generator`` is None.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Fn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
Sampler = Callable[[int, torch.Generator | None], tuple[Any, Any]]
Constraint = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Oracle:
    r"""Gradients and Hessian-vector products of ``upper`` and ``lower``, with counters.

    Args:
        upper: :math:`f(x, y, \text{batch}) \to` scalar.
        lower: :math:`g(x, y, \text{batch}) \to` scalar, strongly convex in ``y``.
        data: The sampler (None: deterministic, every batch is None).
        blocks: :math:`m`, the number of lower-level problems.

    Attributes:
        n_grads: First-order gradients of ``upper`` or ``lower`` evaluated.
        n_hvps: Second-order products: one double backward gives both
            :math:`\nabla^2_{yy} g\,u` and :math:`\nabla^2_{xy} g\,u`, and counts once.
    """

    def __init__(self, upper: Fn, lower: Fn, data: Sampler | None, blocks: int):
        self.upper, self.lower, self.data, self.blocks = upper, lower, data, blocks
        self.n_grads = 0
        self.n_hvps = 0

    def batch(self, i: int, gen: torch.Generator | None) -> tuple[Any, Any]:
        """``(upper_batch, lower_batch)`` of block ``i`` (all of it when ``gen`` is None)."""
        return (None, None) if self.data is None else self.data(i, gen)

    def value(self, x: torch.Tensor, Y: torch.Tensor) -> float:
        r""":math:`\frac1m\sum_i f(x, y_i)` on all data (not counted: it is the diagnostic)."""
        with torch.no_grad():
            vals = [self.upper(x, Y[i], self.batch(i, None)[0]) for i in range(self.blocks)]
        return float(torch.stack([_scalar(v, "upper") for v in vals]).mean())

    def grad_upper(self, x, y, batch) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``(∇_x f, ∇_y f)``."""
        return self._gradient(self.upper, "upper", x, y, batch)

    def grad_lower(self, x, y, batch) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``(∇_x g, ∇_y g)``."""
        return self._gradient(self.lower, "lower", x, y, batch)

    def _lower_gradient_graph(self, x, y, batch) -> tuple[torch.Tensor, ...]:
        r"""Leaves ``x``, ``y`` and :math:`\nabla_y g` with its graph (for a double backward)."""
        x, y = _leaf(x), _leaf(y)
        g = _scalar(self.lower(x, y, batch), "lower")
        (gy,) = torch.autograd.grad(g, y, create_graph=True)
        return x, y, gy

    def _gradient(self, fn: Fn, who: str, x, y, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = _leaf(x), _leaf(y)
        value = _scalar(fn(x, y, batch), who)
        self.n_grads += 1
        dx, dy = _grads(value, (x, y))
        return dx, dy

    def lower_products(self, x, y, u, batch) -> tuple[torch.Tensor, ...]:
        r"""``(∇_y g, ∇²_yy g u, ∇²_xy g u)``: one gradient and one double backward."""
        x, y, gy = self._lower_gradient_graph(x, y, batch)
        Hu = _grads((gy * u).sum(), (y, x))
        self.n_grads += 1
        self.n_hvps += 1
        return gy.detach(), Hu[0], Hu[1]

    def hessian(self, x, y, batch) -> Callable[[torch.Tensor], torch.Tensor]:
        r"""``U -> ∇²_yy g U`` at one point, ``U`` of shape ``(*y.shape, k)``.

        The graph of :math:`\nabla_y g` is built once and kept, so each product (one per
        column) is one backward pass; the graph lives as long as the returned function.
        """
        x, y = x.detach(), _leaf(y)
        g = _scalar(self.lower(x, y, batch), "lower")
        (gy,) = torch.autograd.grad(g, y, create_graph=True)
        self.n_grads += 1

        def products(U: torch.Tensor) -> torch.Tensor:
            cols = [
                torch.autograd.grad(gy, y, U[..., j], retain_graph=True)[0]
                for j in range(U.shape[-1])
            ]
            self.n_hvps += U.shape[-1]
            return torch.stack(cols, -1)

        return products

    def mixed(self, x, y, u, batch) -> torch.Tensor:
        r""":math:`\nabla^2_{xy} g\,u` (shape of ``x``): one double backward."""
        x, y, gy = self._lower_gradient_graph(x, y, batch)
        (out,) = _grads((gy * u).sum(), (x,))
        self.n_hvps += 1
        return out


def require_positive(options: Any, names: tuple[str, ...]) -> None:
    """Refuse an options dataclass whose fields ``names`` are not > 0."""
    for name in names:
        value = getattr(options, name)
        if not value > 0:
            raise ValueError(
                f"{type(options).__name__}: {name} must be > 0, got {value!r}; pass a positive "
                f"{name} (or leave the default)."
            )


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def _scalar(v: Any, who: str) -> torch.Tensor:
    if not torch.is_tensor(v) or v.numel() != 1:
        shape = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
        raise ValueError(
            f"bilevel.solve: the {who} function must return a scalar tensor (the mean loss), "
            f"got {shape}; reduce it with .mean() or .sum()."
        )
    if not torch.isfinite(v).all():
        raise FloatingPointError(
            f"bilevel.solve: the {who} function returned {float(v.detach())}; lower the step sizes "
            "(lr, inner_lr) or check the data for non-finite values."
        )
    return v.reshape(())


def _grads(
    out: torch.Tensor, wrt: tuple[torch.Tensor, ...], *, retain_graph: bool = False
) -> tuple[torch.Tensor, ...]:
    """Detached gradients of ``out``; zeros for inputs it does not depend on."""
    gs = torch.autograd.grad(out, wrt, retain_graph=retain_graph, allow_unused=True)
    return tuple(
        torch.zeros_like(w) if g is None else g.detach() for g, w in zip(gs, wrt, strict=True)
    )
