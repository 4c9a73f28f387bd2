"""Loss landscapes: the loss on a 1D or 2D grid around the weights, evaluated in batches."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import vmap

from ..problem.objective import Objective
from ._directions import directions as make_directions

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass(frozen=True)
class Landscape:
    r"""The loss on a grid around the weights.

    Attributes:
        values: ``(steps,)`` for 1D or ``(steps, steps)`` for 2D float64 losses;
            ``values[i, j]`` is the loss at :math:`\theta + a_i u + b_j v`.
        axes: The grid coordinates, one ``(steps,)`` tensor per dimension.
        directions: ``(d, dims)`` the directions :math:`u` (and :math:`v`), flat.
        kind: ``"filter"``, ``"hessian"``, ``"random"`` or ``"given"``.
        center: The loss at the weights themselves.
        eigenvalues: The Hessian eigenvalues of the axes (``kind="hessian"``), else None.
        n_evaluations: Loss evaluations (grid points; each is one forward pass over the data).
        seconds: Wall time of the evaluations.
    """

    values: torch.Tensor
    axes: tuple[torch.Tensor, ...]
    directions: torch.Tensor
    kind: str
    center: float
    eigenvalues: torch.Tensor | None
    n_evaluations: int
    seconds: float

    def curvature_along(self, axis: int = 0) -> float:
        r"""The second difference of the loss at the centre along one axis.

        .. math:: \frac{L(h e) - 2 L(0) + L(-h e)}{h^2} \approx u^\top H u,

        with :math:`h` the grid spacing and :math:`u` the axis' direction: the top Hessian
        eigenvalue :math:`\lambda_1` along a unit top eigenvector (``kind="hessian"``), up to
        :math:`O(h^2)`.

        Raises:
            ValueError: an even number of steps (no grid point at the centre) or a bad axis.
        """
        steps = len(self.axes[0])
        if steps % 2 == 0 or not 0 <= axis < len(self.axes):
            raise ValueError(
                f"curvature_along: needs an odd number of steps (got {steps}) and an axis in "
                f"0..{len(self.axes) - 1} (got {axis})."
            )
        c, h = steps // 2, float(self.axes[axis][1] - self.axes[axis][0])
        line = self.values if self.values.dim() == 1 else self.values.select(1 - axis, c)
        return float(line[c + 1] - 2 * line[c] + line[c - 1]) / h**2

    def plot(self, ax: Any = None, *, title: str | None = None) -> Any:
        """A matplotlib figure: the loss curve (1D) or its contours (2D)."""
        import matplotlib.pyplot as plt

        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(5, 4))
        names = _axis_names(self.kind)
        if self.values.dim() == 1:
            ax.plot(self.axes[0].numpy(), self.values.numpy())
            ax.set_xlabel(names[0])
            ax.set_ylabel("loss")
        else:
            a, b = (t.numpy() for t in self.axes)
            levels = ax.contour(a, b, self.values.T.numpy(), levels=20, cmap="viridis")
            ax.clabel(levels, fontsize=6)
            ax.plot([0], [0], "k+")
            ax.set_xlabel(names[0])
            ax.set_ylabel(names[1])
        ax.set_title(title or f"loss landscape ({self.kind} directions)")
        return fig if fig is not None else ax.figure


def _axis_names(kind: str) -> tuple[str, str]:
    if kind == "hessian":
        return ("along eigenvector 1", "along eigenvector 2")
    return (f"along {kind} direction 1", f"along {kind} direction 2")


def landscape(
    obj: Objective,
    directions: Any = "filter",
    *,
    span: float = 1.0,
    steps: int = 41,
    dims: int = 1,
    seed: int = 0,
    chunk: int = 8,
) -> Landscape:
    r"""The loss around the weights along one or two directions, as Li et al. (2018) draw it.

    .. math:: f(a, b) = L(\theta + a\,u + b\,v), \qquad a, b \in [-\mathrm{span}, \mathrm{span}]

    Directions:

    - ``"filter"``: Gaussian, rescaled filter by filter to the weights' norms; biases and
      normalization weights get 0 (Li, Xu, Taylor, Studer & Goldstein 2018, "Visualizing the
      loss landscape of neural nets"; see ``_directions.filter_normalized``). ``span=1`` moves
      each filter by its own norm.
    - ``"hessian"``: the unit top eigenvectors of the Hessian (largest eigenvalues), the axes
      LLA compares with the random ones ("Investigating generalization by means of loss
      landscapes and Hessian analysis"); ``span`` is a Euclidean distance then.
    - ``"random"``: isotropic Gaussian of unit norm; ``span`` is a Euclidean distance.
    - ``u`` or ``(u, v)``: flat ``(d,)`` vectors used as they are.

    The grid points are evaluated together: for each batch, chunks of ``chunk`` parameter sets
    run through ``torch.func.vmap`` of ``functional_call``, so the grid costs its number of
    points times one forward pass over the data, in one pass over the batches. The model's
    own parameters are never written (``functional_call`` swaps in the grid's tensors and puts
    the originals back, on an exception too).

    Batch-norm: evaluated as LLA recommends, in eval mode with the running statistics the
    model has (the Objective refuses train-mode batch-norm by default, and this function
    refuses it always): batch statistics would re-normalize each perturbed layer and flatten
    the landscape along every direction that only rescales a filter.

    Args:
        obj: The objective (model, data, loss) at the weights :math:`\theta`.
        directions: ``"filter"``, ``"hessian"``, ``"random"``, a ``(d,)`` vector, or a tuple of
            ``dims`` of them.
        span: Half-width of the grid in units of the directions.
        steps: Grid points per axis (odd, so that the weights themselves are a point).
        dims: 1 or 2.
        seed: Seed of the random directions (and of the Lanczos start).
        chunk: Parameter sets per vectorized call (memory grows with it). On the digits CNN
            (1797 images in one batch, one CPU thread) a point cost 0.68x one forward pass at
            ``chunk=8``, 0.78x at 1, 1.03x at 16 and 1.41x at 64.

    Returns:
        Landscape.

    Raises:
        ValueError: ``dims`` not 1 or 2, ``steps < 3``, a batch-norm layer in training mode,
            or bad directions.

    Example:
        >>> from torch import nn
        >>> x = torch.eye(2, dtype=torch.float64)
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> obj = Objective(model, [(x, torch.zeros(2, 1, dtype=torch.float64))],
        ...                 nn.functional.mse_loss)
        >>> ls = landscape(obj, "hessian", span=0.5, steps=5)
        >>> round(ls.curvature_along(0), 8)  # H = I for the mean squared error on I
        1.0
    """
    if dims not in (1, 2) or steps < 3:
        raise ValueError(f"landscape: dims must be 1 or 2 and steps >= 3, got {dims}, {steps}.")
    _refuse_train_batchnorm(obj.model)
    kind, D, values = make_directions(obj, directions, dims, seed)
    axis = torch.linspace(-span, span, steps, dtype=torch.float64)
    grids = torch.meshgrid(*([axis] * dims), indexing="ij")
    coords = torch.stack([g.reshape(-1) for g in grids], 1)
    start = time.perf_counter()
    losses = grid_losses(obj, D, coords, chunk)
    seconds = time.perf_counter() - start
    center = float(obj.value())
    shape = (steps,) * dims
    return Landscape(
        losses.reshape(shape), (axis,) * dims, D, kind, center, values, len(coords), seconds
    )


def grid_losses(obj: Objective, D: torch.Tensor, coords: torch.Tensor, chunk: int) -> torch.Tensor:
    r"""Mean losses at :math:`\theta + D c` for every row :math:`c` of ``coords``, in one data pass.

    Args:
        obj: The objective at :math:`\theta`.
        D: ``(d, m)`` directions.
        coords: ``(G, m)`` coordinates.
        chunk: Parameter sets per ``vmap`` call.

    Returns:
        ``(G,)`` float64 losses.
    """
    theta = obj.space.join(obj.params)
    C = coords.to(device=D.device, dtype=D.dtype)

    def term(index: int, batch: Any) -> tuple[torch.Tensor, float]:
        weights: list[float] = []

        def one(params: dict[str, torch.Tensor]) -> torch.Tensor:
            value, w = obj.batch_loss(params, batch)
            weights.append(w)
            return value

        parts = []
        for i in range(0, len(C), chunk):
            P = theta[:, None] + D @ C[i : i + chunk].T
            parts.append(vmap(one)(obj.space.split(P)))
        return torch.cat(parts), weights[0]

    with torch.no_grad():
        return obj.accumulate(term).to(torch.float64).cpu()


def _refuse_train_batchnorm(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, _BATCHNORM) and m.training:
            raise ValueError(
                f"landscape: batch-norm module {name!r} is in training mode; a landscape "
                "evaluated with batch statistics re-normalizes every perturbed layer (LLA's "
                "batch-norm pitfall). Call model.eval() to use the running statistics."
            )
