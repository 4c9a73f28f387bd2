"""Shared plumbing of the algorithms: operator access, random probes, confidence intervals."""

from __future__ import annotations

from typing import Any, Protocol, overload, runtime_checkable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..operators import SYMMETRIC, infer_tags


@runtime_checkable
class OperatorLike(Protocol):
    """What the algorithms need of an operator: ``shape``, ``dtype``, ``device`` and ``@``.

    ``A @ V`` takes ``V`` of shape ``(d,)`` or ``(d, k)``.
    """

    shape: Any
    dtype: torch.dtype
    device: Any

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Tagged(Protocol):
    """An operator that declares its structure.

    ``tags`` holds ``"symmetric"``, ``"psd"``; None declares nothing.
    """

    tags: frozenset[str] | None


class ScipyOperator:
    """A ``scipy.sparse.linalg.LinearOperator`` (or sparse matrix) seen as a float64 operator.

    Products go through ``matmat`` on float64 numpy arrays on the CPU. ``tags`` is None (no
    declared structure) for a ``LinearOperator``, and inferred for a sparse matrix.
    """

    def __init__(self, A: Any):
        from scipy import sparse
        from scipy.sparse.linalg import aslinearoperator

        self.op = aslinearoperator(A)
        self.shape = tuple(self.op.shape)
        self.dtype, self.device = torch.float64, torch.device("cpu")
        self.tags = _sparse_tags(A) if sparse.issparse(A) else None

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        X = V.detach().to("cpu", torch.float64).numpy()
        out = self.op.matmat(X) if X.ndim == 2 else self.op.matvec(X)
        return torch.as_tensor(np.asarray(out, dtype=np.float64).reshape(X.shape))


def _is_scipy(A: Any) -> bool:
    """A scipy ``LinearOperator`` or sparse matrix (scipy is imported only for such objects)."""
    if not any(c.__module__.startswith("scipy.") for c in type(A).__mro__):
        return False
    from scipy import sparse
    from scipy.sparse.linalg import LinearOperator

    return isinstance(A, LinearOperator) or sparse.issparse(A)


def as_operator(A: Any) -> Any:
    """``A`` as something with ``shape``, ``dtype``, ``device`` and ``@``.

    A ``torch.Tensor`` or any object with those attributes passes through; a numpy array becomes
    a float64 tensor; a ``scipy.sparse.linalg.LinearOperator`` or a scipy sparse matrix becomes
    a :class:`ScipyOperator`.
    """
    if isinstance(A, torch.Tensor):
        if not A.dtype.is_floating_point:
            raise TypeError(f"expected a floating-point matrix, got dtype {A.dtype}.")
        return A
    if isinstance(A, np.ndarray):
        return torch.from_numpy(np.asarray(A, dtype=np.float64))
    if not isinstance(A, OperatorLike) and _is_scipy(A):
        return ScipyOperator(A)
    if not isinstance(A, OperatorLike):
        missing = [a for a in ("shape", "dtype", "device", "__matmul__") if a not in dir(A)]
        raise TypeError(
            f"expected a square operator (a torch.Tensor, a numpy array, a scipy LinearOperator, "
            f"or an object with shape, dtype, device and @), got {type(A).__name__} without "
            f"{', '.join(missing)}."
        )
    return A


def _progress_bar(progress: bool | None, total: int | None, desc: str) -> tqdm:
    """A tqdm bar; ``progress=None`` shows it only on a terminal and only after a second."""
    if progress is None:
        return tqdm(total=total, desc=desc, unit="matvec", leave=False, disable=None, delay=1.0)
    return tqdm(total=total, desc=desc, unit="matvec", leave=False, disable=not progress)


class Counted:
    """Applies ``A`` (any input :func:`as_operator` takes) and counts the columns applied to.

    Each product ``A @ V`` runs in ``A``'s dtype and on its device: ``V`` is cast first, and the
    result comes back in ``A``'s dtype.

    Args:
        A: The operator.
        progress: Progress bar: True, False, or None (on a terminal, after a second).
        total: Products the bar counts up to.
        desc: The algorithm's name, for the bar and for error messages (``name``).
    """

    def __init__(
        self, A: Any, progress: bool | None = False, total: int | None = None, desc: str = ""
    ):
        A = as_operator(A)
        if len(A.shape) != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"expected a square operator, got shape {tuple(A.shape)}.")
        self.A, self.d = A, A.shape[0]
        self.dtype, self.device = A.dtype, torch.device(A.device)
        self.n, self.name = 0, desc
        self.bar = _progress_bar(progress, total, desc)

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        self.n += V.shape[1]
        self.bar.update(V.shape[1])
        return self.A @ V.to(device=self.device, dtype=self.dtype)

    def close(self) -> None:
        self.bar.close()


@overload
def tags_of(A: Any, default: frozenset[str] = ...) -> frozenset[str]: ...
@overload
def tags_of(A: Any, default: None) -> frozenset[str] | None: ...
def tags_of(A: Any, default: frozenset[str] | None = frozenset()) -> frozenset[str] | None:
    """Declared structure of an operator: inferred for a dense or sparse matrix, else its tags.

    Args:
        A: Any input :func:`as_operator` takes.
        default: What an operator that declares nothing gets (a scipy ``LinearOperator``, an
            object without ``tags``, or ``tags=None``).
    """
    A = as_operator(A)
    if isinstance(A, torch.Tensor):
        return infer_tags(A)
    tags = A.tags if isinstance(A, Tagged) else None
    return default if tags is None else tags


def require_symmetric(A: Any, who: str) -> None:
    """Refuse ``A`` when it is known not to be symmetric before any product.

    A dense matrix is checked entry by entry (``|A - A^T| <= rtol max|A|``); an operator that
    declares tags must declare ``"symmetric"``; one that declares none (a scipy
    ``LinearOperator``, an object without tags) is checked by the Lanczos run itself, which
    measures the asymmetry of its products (see ``hesse.linalg._lanczos``).

    Raises:
        ValueError: naming ``who`` and how to fix the input.
    """
    A = as_operator(A)
    if isinstance(A, torch.Tensor):
        gap, rtol = _asymmetry(A)
        if gap > rtol:
            raise ValueError(
                f"{who}: the matrix is not symmetric (max |A - A^T| / max |A| = {gap:.2e} > "
                f"{rtol:.1e}); Lanczos needs a symmetric operator. Pass (A + A.T) / 2 if the "
                "asymmetry is round-off, or use a non-symmetric eigensolver."
            )
        return
    tags = tags_of(A, default=None)
    if tags is not None and SYMMETRIC not in tags:
        raise ValueError(
            f"{who}: the operator {type(A).__name__} does not declare the tag 'symmetric' "
            f"(tags: {sorted(tags)}); Lanczos needs a symmetric operator. Build it with "
            "tags=('symmetric',) if it is symmetric."
        )


def _asymmetry(M: torch.Tensor) -> tuple[float, float]:
    """Relative asymmetry ``max|M - M^T| / max|M|`` and the round-off level allowed for it."""
    scale = float(M.abs().max()) if M.numel() else 0.0
    gap = float((M - M.T).abs().max()) / scale if scale > 0 else 0.0
    return gap, min(1e-3, 100 * torch.finfo(M.dtype).eps * M.shape[0])


def _sparse_tags(A: Any) -> frozenset[str]:
    """``{"symmetric"}`` when the sparse matrix ``A`` is symmetric up to float64 round-off."""
    scale = abs(A).max()
    gap = abs(A - A.T).max() / scale if scale > 0 else 0.0
    rtol = min(1e-3, 100 * np.finfo(np.float64).eps * A.shape[0])
    return frozenset({SYMMETRIC}) if gap <= rtol else frozenset()


def generator(seed: int) -> torch.Generator:
    """The CPU generator all probes come from: the same numbers on any device or process."""
    return torch.Generator().manual_seed(int(seed))


def rademacher(
    gen: torch.Generator, d: int, k: int, like: Counted, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``(d, k)`` random signs (Hutchinson 1989 probes) in ``dtype`` (default ``like.dtype``)."""
    z = torch.randint(0, 2, (d, k), generator=gen, dtype=torch.int8) * 2 - 1
    return z.to(device=like.device, dtype=dtype or like.dtype)


def gaussian(
    gen: torch.Generator, d: int, k: int, like: Counted, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``(d, k)`` standard normal entries, drawn in float64 on the CPU.

    They go to ``like``'s device in ``dtype`` (default ``like.dtype``).
    """
    z = torch.randn(d, k, generator=gen, dtype=torch.float64)
    return z.to(device=like.device, dtype=dtype or like.dtype)


def mean_ci(samples: torch.Tensor) -> tuple[float, float, tuple[float, float]]:
    """Mean, standard error and Student-t 95% interval of i.i.d. ``samples`` (n,)."""
    x = samples.double()
    n = x.numel()
    mean = float(x.mean())
    if n < 2:
        return mean, float("inf"), (float("-inf"), float("inf"))
    se = float(x.std(unbiased=True)) / n**0.5
    return mean, se, t_interval(mean, se, n)


def t_quantile(n: int) -> float:
    """The 97.5% quantile of Student's t with ``n - 1`` degrees of freedom (95%, two-sided)."""
    from scipy import stats  # 0.3 s to import: loaded by the first interval, not by hesse

    return float(stats.t.ppf(0.975, n - 1))


def t_interval(mean: float, se: float, n: int) -> tuple[float, float]:
    """Student-t 95% interval of a mean of ``n`` samples (``mean +- se`` below two samples)."""
    half = t_quantile(n) * se if n >= 2 else se
    return mean - half, mean + half
