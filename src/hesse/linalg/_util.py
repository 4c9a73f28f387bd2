"""Shared plumbing of the algorithms: operator access, random probes, confidence intervals."""

from __future__ import annotations

from typing import Any, Protocol, overload, runtime_checkable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..operators import SYMMETRIC, Operator, infer_tags


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
class Approximate(Protocol):
    r"""An operator whose products carry a measured error (finite differences).

    ``product_error`` bounds :math:`\|A v - \tilde A v\| / \|v\|` over the products made so far.
    """

    product_error: float


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


CHUNK_BYTES = 1 << 20
"""Largest temporary of a chunked float64 reduction. Temporaries of many MiB, allocated and
freed at every Lanczos step, raise glibc's mmap threshold, and the heap then holds on to the
memory of every smaller allocation after it (measured: 40 MiB more peak RSS on a 320k-parameter
top-10 run with 64k-row chunks)."""


def chunk_rows(cols: int) -> int:
    """Rows per chunk of a float64 reduction over ``cols`` columns: ``CHUNK_BYTES`` at most."""
    return max(256, CHUNK_BYTES // (8 * max(1, cols)))


def shard_of(A: Any) -> Any:
    """The ``Shard`` of an operator over local shards of the parameters (FSDP), or None."""
    space = A.space if isinstance(A, Operator) else None
    return None if space is None else space.shard


def dimension(A: Any) -> int:
    """The dimension of ``A`` (as :func:`as_operator` takes it): global when it is sharded."""
    shard = shard_of(A)
    return A.shape[0] if shard is None else shard.dim


def _progress_bar(progress: bool | None, total: int | None, desc: str) -> tqdm:
    """A tqdm bar; ``progress=None`` shows it only on a terminal and only after a second."""
    if progress is None:
        return tqdm(total=total, desc=desc, unit="matvec", leave=False, disable=None, delay=1.0)
    return tqdm(total=total, desc=desc, unit="matvec", leave=False, disable=not progress)


class Counted:
    """Applies ``A`` (any input :func:`as_operator` takes) and counts the columns applied to.

    Each product ``A @ V`` runs in ``A``'s dtype and on its device: ``V`` is cast first, and the
    result comes back in ``A``'s dtype.

    It is also the one place where vectors meet across processes: an operator whose layout
    (``A.space``) holds each process's local shard of the parameters (FSDP) has ``shard`` set,
    and :meth:`total`, :meth:`norm` and :meth:`dot` sum their local parts over the processes in
    float64; ``d`` is then the local length and ``dim`` the global one.

    Args:
        A: The operator.
        progress: Progress bar: True, False, or None (on a terminal, after a second).
        total: Products the bar counts up to.
        desc: The algorithm's name, for the bar and for error messages (``name``).

    Attributes:
        error: The largest error per unit input of the products so far (an
            :class:`Approximate` operator's ``product_error``; 0 for exact products).
    """

    def __init__(
        self, A: Any, progress: bool | None = False, total: int | None = None, desc: str = ""
    ):
        A = as_operator(A)
        if len(A.shape) != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"expected a square operator, got shape {tuple(A.shape)}.")
        self.A, self.d = A, A.shape[0]
        self.shard = shard_of(A)
        self.dim = self.d if self.shard is None else self.shard.dim
        self.dtype, self.device = A.dtype, torch.device(A.device)
        self.n, self.name, self.error = 0, desc, 0.0
        self.basis_dtype: torch.dtype | None = None  # of the Lanczos basis; None: float64
        # hesse's operators copy their input into per-parameter tensors and a tensor multiplies
        # strided blocks: a column block of the basis can go as a view (not to collectives)
        self.takes_views = self.shard is None and isinstance(A, (Operator, torch.Tensor))
        self.bar = _progress_bar(progress, total, desc)

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        self.n += V.shape[1]
        self.bar.update(V.shape[1])
        out = self.A @ V.to(device=self.device, dtype=self.dtype)
        if isinstance(self.A, Approximate):  # what every bound must then allow for
            self.error = max(self.error, float(self.A.product_error))
        return out

    def close(self) -> None:
        self.bar.close()

    def total(self, t: torch.Tensor) -> torch.Tensor:
        """A sum of local parts over the processes (float64); ``t`` itself on one process."""
        return t if self.shard is None else self.shard.sum(t)

    def norm(self, V: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        """Euclidean norm of ``V`` (of its columns with ``dim=0``), over all shards."""
        if self.shard is None and (V.dtype == torch.float64 or V.device.type == "mps"):
            return torch.linalg.vector_norm(V, dim=dim)
        return self.total(_squares64(V, dim)).sqrt().to(V.dtype)

    def dot64(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """``X^T Y`` accumulated in float64 over all shards, whatever the dtype of ``X``.

        A float64 ``X`` is multiplied as it is; a lower-precision one (a float32 basis) in row
        chunks cast to float64, so that no float64 copy of it is ever whole.
        """
        if X.dtype == torch.float64 or X.device.type == "mps":
            out = X.T @ Y
        else:
            out = torch.zeros((X.shape[1], *Y.shape[1:]), dtype=torch.float64, device=X.device)
            rows = chunk_rows(X.shape[1] + (Y.shape[1] if Y.dim() == 2 else 1))
            for r in range(0, X.shape[0], rows):
                out += X[r : r + rows].double().T @ Y[r : r + rows].double()
        return self.total(out)

    def dot(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """``X^T Y`` over all shards (in the dtype of ``X``)."""
        return X.T @ Y if self.shard is None else self.shard.sum(X.T @ Y).to(X.dtype)

    def rows(self, full: torch.Tensor) -> torch.Tensor:
        """This process's rows of a tensor laid out on the full (global) dimension."""
        return full if self.shard is None else self.shard.local(full)


def _squares64(V: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Sum of squares of ``V`` (of its columns with ``dim=0``) in float64, in row chunks.

    A float64 copy of a lower-precision ``V`` would double its memory (a float32 Krylov basis
    stored to save memory would lose that saving at every norm); chunks of
    :func:`chunk_rows` rows keep
    the copy small.
    """
    if dim not in (None, 0):
        raise ValueError(f"norm: dim must be None or 0, got {dim}.")
    out = torch.zeros(() if dim is None or V.dim() == 1 else V.shape[1:], dtype=torch.float64)
    out = out.to(V.device)
    rows = chunk_rows(V.shape[1] if V.dim() == 2 else 1)
    for r in range(0, V.shape[0], rows):
        chunk = V[r : r + rows].double().square()
        out += chunk.sum() if dim is None else chunk.sum(0)
    return out


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


DRAW_ROWS = 1 << 16
"""Rows of the full dimension drawn at once under FSDP (a multiple of 16: :func:`_local_draw`)."""


def rademacher(
    gen: torch.Generator, d: int, k: int, like: Counted, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``(d, k)`` random signs (Hutchinson 1989 probes) in ``dtype`` (default ``like.dtype``).

    For a sharded ``like``, the local rows of the signs drawn for the full dimension: the same
    probes on one process and on many, drawn ``DRAW_ROWS`` rows at a time (never a full
    ``(D, k)`` block; see :func:`_local_draw`).
    """

    def draw(rows: int) -> torch.Tensor:
        return torch.randint(0, 2, (rows, k), generator=gen, dtype=torch.int8)

    z = draw(d) if like.shard is None else _local_draw(draw, like.dim, k, like.shard.index)
    return (z * 2 - 1).to(device=like.device, dtype=dtype or like.dtype)


def gaussian(
    gen: torch.Generator, d: int, k: int, like: Counted, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``(d, k)`` standard normal entries, drawn in float64 on the CPU.

    They go to ``like``'s device in ``dtype`` (default ``like.dtype``); for a sharded ``like``,
    the local rows of those drawn for the full dimension (see :func:`rademacher`).
    """

    def draw(rows: int) -> torch.Tensor:
        return torch.randn(rows, k, generator=gen, dtype=torch.float64)

    z = draw(d) if like.shard is None else _local_draw(draw, like.dim, k, like.shard.index)
    return z.to(device=like.device, dtype=dtype or like.dtype)


def _local_draw(draw, D: int, k: int, index: torch.Tensor) -> torch.Tensor:
    """The rows ``index`` of ``draw(D)`` ``(D, k)``, drawn in blocks of ``DRAW_ROWS`` rows.

    The blocks take the generator's numbers in the order one draw of all ``D`` rows takes them,
    so they hold the same numbers wherever PyTorch's CPU sampler is sequential in the entries:
    ``randint`` always; ``randn`` (Box-Muller on groups of 16 uniforms, the last 16 entries
    redrawn when the count is not a multiple of 16) when every block but the last holds a
    multiple of 16 entries and the last at least 16, which these blocks do
    (``tests/linalg/test_probe_rows.py`` checks both against the one-shot draw).

    Args:
        draw: ``draw(rows) -> (rows, k)`` from the shared generator.
        D: The full dimension.
        k: Columns.
        index: ``(d,)`` global positions of this process's rows.

    Returns:
        ``(d, k)``: row ``i`` is row ``index[i]`` of the full draw.
    """
    bounds = list(range(0, D, DRAW_ROWS)) + [D]
    if len(bounds) > 2 and (bounds[-1] - bounds[-2]) * k < 16:
        del bounds[-2]  # a short last block joins the one before (randn's tail, see above)
    # the local rows in global order: each block's are one slice of them
    positions, order = index.cpu().sort()
    cuts = torch.searchsorted(positions, torch.tensor(bounds)).tolist()
    out: torch.Tensor | None = None
    for b, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        block = draw(stop - start)
        if out is None:
            out = block.new_empty(len(positions), k)
        lo, hi = cuts[b], cuts[b + 1]
        out[order[lo:hi]] = block[positions[lo:hi] - start]
    assert out is not None  # D >= 1
    return out


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
