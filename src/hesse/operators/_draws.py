"""Targets drawn from a model's predictive distribution, fixed by each sample's position."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..problem.objective import Objective


class TargetSampler:
    """Targets drawn from the distribution whose negative log-likelihood is the loss.

    Args:
        objective: With a cross-entropy (categorical targets) or an MSE loss (Gaussian ones).
        kind: The loss's kind, ``"cross_entropy"`` or ``"mse"``.
        seed: Seed of the draws.
        count: Draws per sample.

    Raises:
        ValueError: another loss, or a class-weighted or label-smoothed cross-entropy.
    """

    def __init__(self, objective: Objective, kind: str | None, *, seed: int, count: int):
        samplers = {"cross_entropy": _sample_categorical, "mse": _sample_gaussian}
        spec = objective.loss_spec
        if kind not in samplers:
            raise ValueError(
                "FisherOperator(kind='mc'): can sample targets for cross_entropy and mse_loss "
                f"only; got {objective.loss!r}. Use kind='empirical' or GGNOperator for other "
                "losses."
            )
        if spec is not None and (spec.class_weighted or spec.label_smoothing):
            smoothing = f"label_smoothing={spec.label_smoothing}"
            what = "class weights" if spec.class_weighted else smoothing
            raise ValueError(
                f"FisherOperator(kind='mc'): a cross-entropy with {what} is not the negative "
                "log-likelihood of the model's predictive distribution, so sampled targets do "
                "not give its Fisher; use GGNOperator (exact for this loss) or kind='empirical'."
            )
        self.objective, self.seed, self.count = objective, seed, count
        self.sample: Callable = samplers[kind]

    def __call__(self, index: int, y: torch.Tensor, f: torch.Tensor, w: float) -> list:
        """``count`` targets like ``y`` for batch ``index`` with outputs ``f`` and weight ``w``.

        Ignored labels stay ignored: a draw in their place would add a term the loss leaves out.
        """
        positions = self.objective.sample_positions(index)
        if len(positions) == 0 or f.shape[0] % len(positions):
            raise ValueError(
                f"FisherOperator(kind='mc'): batch {index} has {len(positions)} samples but "
                f"{f.shape[0]} output rows; the draws need a whole number of rows per sample."
            )
        samples = [self.sample(f, w, Draws(self.seed, positions, s)) for s in range(self.count)]
        spec = self.objective.loss_spec
        ignore = spec.ignore_index if spec is not None else -100
        if y.is_floating_point() or ignore is None:  # mse has no ignore_index
            return samples
        return [torch.where(y == ignore, y, s) for s in samples]


def _sample_categorical(f: torch.Tensor, w: float, draws: Draws) -> torch.Tensor:
    """Classes along dim 1 (as in cross_entropy), drawn by inverting the CDF."""
    logits = f.movedim(1, -1)
    p = torch.softmax(logits.double(), -1).cpu()
    C = p.shape[-1]
    u = draws.uniform(p.shape[:-1])[..., None]
    y = (p.cumsum(-1) < u).sum(-1).clamp_max(C - 1)
    return y.to(f.device)


def _sample_gaussian(f: torch.Tensor, w: float, draws: Draws) -> torch.Tensor:
    # mean-reduced MSE scaled by w is (w / numel) * ||f - y||^2, the negative log-likelihood
    # of y ~ N(f, numel / (2 w)); that variance makes E[r r^T] equal the loss Hessian.
    std = (f.numel() / (2.0 * w)) ** 0.5 if w else 0.0  # w = 0: an empty batch
    noise = torch.special.ndtri(draws.uniform(f.shape))
    return f + std * noise.to(device=f.device, dtype=f.dtype)


class Draws:
    """Uniform numbers fixed by ``(seed, sample position, draw number, index within sample)``.

    A counter-based generator (the SplitMix64 finalizer of Steele et al. 2014, "Fast
    splittable pseudorandom number generators", applied to the hashed key), vectorized over
    samples: a sample's numbers do not depend on its batch, its process or the device.

    Args:
        seed: Seed of the draws.
        positions: ``(n,)`` int64 global positions of the batch's samples.
        draw: Draw number.

    Example:
        >>> a = Draws(0, torch.tensor([3, 4]), 0).uniform(torch.Size([2, 2]))
        >>> b = Draws(0, torch.tensor([4]), 0).uniform(torch.Size([1, 2]))
        >>> torch.equal(a[1], b[0])  # sample 4 draws the same numbers in any batch
        True
    """

    def __init__(self, seed: int, positions: torch.Tensor, draw: int):
        key = _mix(torch.full_like(positions.cpu(), seed) * _GOLDEN + _GOLDEN)
        self.key = _mix(_mix(key ^ positions.cpu()) ^ draw)

    def uniform(self, shape: torch.Size) -> torch.Tensor:
        """float64 numbers in the open interval (0, 1), rows sample-major (as the outputs).

        ``shape[0]`` is a multiple of the number of samples ``n``: each sample owns
        ``numel / n`` consecutive numbers.
        """
        m = shape.numel() // len(self.key)
        h = _mix(self.key[:, None] + torch.arange(1, m + 1) * _GOLDEN)
        return ((_shr(h, 11).double() + 0.5) * 2.0**-53).reshape(shape)


_GOLDEN = 0x9E3779B97F4A7C15 - 2**64  # as a signed int64
_M1, _M2 = 0xBF58476D1CE4E5B9 - 2**64, 0x94D049BB133111EB - 2**64


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch shifts arithmetically)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finalizer on int64 with wrapping arithmetic."""
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)
