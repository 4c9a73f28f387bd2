"""Bytes: free on a device, saved by an autograd graph, and written for people."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

T = TypeVar("T")
GROUP_BYTES = 1 << 30  # default memory of the float64 bases of one group of SLQ probes


def format_bytes(n: int) -> str:
    """``n`` bytes in the largest unit that keeps a digit before the point (``"3.1 GB"``).

    Example:
        >>> format_bytes(3_141_592_653), format_bytes(2048), format_bytes(12)
        ('3.1 GB', '2.0 kB', '12 B')
    """
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
"""Decimal multiples of a size (as the plans print them); ``Ki``... are powers of 1024."""


def size_bytes(size: int | str, who: str = "max_memory") -> int:
    """Bytes from an int or a string such as ``"8G"``, ``"500MB"``, ``"1.5GiB"``, ``"1024"``.

    ``K``, ``M``, ``G``, ``T`` are powers of 1000, ``Ki``, ``Mi``, ``Gi``, ``Ti`` powers of
    1024; a trailing ``B`` is optional.

    Raises:
        ValueError: not a positive size (the message names ``who``).

    Example:
        >>> size_bytes("8G"), size_bytes("500mb"), size_bytes("1.5GiB"), size_bytes(4096)
        (8000000000, 500000000, 1610612736, 4096)
    """
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", str(size), re.IGNORECASE)
    if match is None or float(match[1]) <= 0 or (match[3] and not match[2]):
        raise ValueError(
            f"{who}={size!r} is not a positive size; pass bytes (an int) or a string such as "
            "'2GB', '500M' or '1.5GiB' (K, M, G, T: powers of 1000; Ki, Mi, Gi, Ti: powers of "
            "1024)."
        )
    unit = match[2].lower()
    return int(float(match[1]) * (1024 ** " kmgt".index(unit) if match[3] else SIZE_UNITS[unit]))


def available_bytes(device: torch.device | str) -> int:
    """Memory free for new tensors on ``device``, in bytes.

    CUDA: free device memory plus what torch's allocator holds unused. CPU: ``MemAvailable``
    of ``/proc/meminfo``, lowered to the room left under a cgroup (container) limit; 1 GiB
    where neither can be read (not Linux).
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    room = [r for r in (_meminfo_available(), _cgroup_room()) if r is not None]
    return min(room) if room else 2**30


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_room() -> int | None:
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - used, 0)


def nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's elements."""
    return t.numel() * t.element_size()


def storages(tensors: Iterable[torch.Tensor]) -> set[int]:
    """Addresses of the storages of ``tensors`` (strided ones; others have no storage)."""
    return {_key(t.untyped_storage()) for t in tensors if t.layout == torch.strided}


def _key(s: torch.UntypedStorage) -> int:
    """A storage's identity: its address; on the meta device (all addresses 0) its object's."""
    return s._cdata if s.device.type == "meta" else s.data_ptr()


def saved_bytes(build: Callable[[], T], resident: set[int]) -> tuple[T, int]:
    """``build()`` and the bytes of what autograd saved for its backward while it ran.

    Each storage counts once, whole (a saved view keeps all of it alive); storages in
    ``resident`` (the parameters and buffers) do not count. The pack hook returns a detached
    alias: returning the tensor itself would let a graph node own its own output through the
    tensor's ``grad_fn``, a reference cycle that kept every uncached graph alive (memory grew
    with each product). Autograd re-attaches the history on unpack.
    """
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.layout == torch.strided:
            s = t.untyped_storage()
            if _key(s) not in resident:
                saved[_key(s)] = s.nbytes()
        else:
            saved[id(t)] = nbytes(t)
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
        out = build()
    return out, sum(saved.values())


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


BASIS_HEADROOM = 0.9
"""Share of ``eigs``' tolerance that the round-off of a float32 basis may take (see below)."""

FLOAT32_BASIS_FROM = 2**28
"""Bytes of a float64 basis from which ``eigs`` stores it in float32 by default (256 MiB)."""


def auto_basis_dtype(
    dtype: torch.dtype,
    width: int,
    tol: float,
    device: torch.device | str = "cpu",
    dim: int | None = None,
) -> torch.dtype:
    r"""The dtype ``eigs`` stores its Krylov basis in when none is given.

    float32 for products in float32 or lower when the float64 basis, ``width * dim * 8``
    bytes, would reach ``FLOAT32_BASIS_FROM`` (where memory matters) and the bounds'
    round-off floor, products and storage, :math:`(\varepsilon + \varepsilon_{32}\sqrt{w})
    \,\|A\|` for ``w`` basis vectors, stays within ``BASIS_HEADROOM`` of ``tol`` (half the
    memory of float64; the products' own round-off is already
    :math:`\varepsilon \ge \varepsilon_{32}`); float64 otherwise and for float64 products:
    a float32 basis keeps the values and bounds honest but can take more products to converge
    on clustered eigenvalues (a small BERT's top 3: 136 products in float64, not converged in
    150 in float32). float32 on MPS, which has no float64. With the default tolerance of
    float32 products (:math:`8\varepsilon_{32}`), float32 holds up to ``w`` = 38 (``k`` <= 17
    at the default ``ncv``).

    Args:
        dtype: The products' dtype.
        width: Basis vectors held at once (``ncv`` plus the block).
        tol: The run's relative residual tolerance.
        device: The operator's device.
        dim: The operator's dimension (local rows under FSDP); None: memory matters.

    Example:
        >>> auto_basis_dtype(torch.float32, 23, 8 * torch.finfo(torch.float32).eps)
        torch.float32
        >>> auto_basis_dtype(torch.float32, 23, 8 * torch.finfo(torch.float32).eps, dim=10**5)
        torch.float64
        >>> auto_basis_dtype(torch.float64, 23, 1e-10)
        torch.float64
    """
    if torch.device(device).type == "mps":
        return torch.float32
    if dim is not None and width * dim * 8 < FLOAT32_BASIS_FROM:
        return torch.float64
    eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
    if dtype == torch.float64 or eps + eps32 * math.sqrt(width) > BASIS_HEADROOM * tol:
        return torch.float64
    return torch.float32


def probe_group(d: int, steps: int, probes: int, group: int | None = None) -> int:
    """Probes per product of :func:`hesse.density`: ``group``, else as many as fit ``GROUP_BYTES``.

    Args:
        d: Dimension of the operator.
        steps: Lanczos steps per probe (at most ``d``).
        probes: Number of probes.
        group: The caller's choice, or None.

    Example:
        >>> probe_group(10**8, 80, 10)  # 81 float64 vectors of 1e8 entries exceed 1 GiB
        1
    """
    return min(probes, group or max(1, GROUP_BYTES // ((steps + 1) * d * 8)))
