"""Uniform fake-quantization of weight matrices: round-to-nearest on a per-group grid."""

from __future__ import annotations

from dataclasses import dataclass

import torch

GRANULARITIES = ("tensor", "channel", "group")


@dataclass(frozen=True)
class Codes:
    r"""Integer codes of a weight matrix: :math:`W \approx s\,(q - z)` group by group.

    Attributes:
        q: Integer codes, shape ``(groups, rows_per_group * columns)`` (float tensor holding
            integers).
        scale: ``(groups, 1)`` step sizes :math:`s`.
        zero: ``(groups, 1)`` zero points :math:`z` (0 for a symmetric grid).
        bits: The width of the codes.
        shape: The weight's shape.
        lo: Smallest code.
        hi: Largest code.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    shape: torch.Size
    lo: int
    hi: int

    def dequantize(self) -> torch.Tensor:
        r""":math:`s\,(q - z)` in the weight's shape."""
        return (self.scale * (self.q - self.zero)).reshape(self.shape)

    def project(self, V: torch.Tensor) -> torch.Tensor:
        """Another tensor of the weight's shape rounded to this grid (same steps and zeros)."""
        X = V.reshape(self.q.shape).double() / self.scale + self.zero
        if self.bits == 1 and self.lo < 0:  # symmetric binary: the two levels are -s and s
            q = torch.where(X >= 0, 1.0, -1.0).to(X.dtype)
        else:
            q = torch.round(X).clamp(self.lo, self.hi)
        return (self.scale * (q - self.zero)).reshape(self.shape).to(V.dtype)


@dataclass(frozen=True)
class Quantizer:
    r"""Uniform round-to-nearest fake-quantization of weight matrices.

    Rows are the output dimension (dim 0; a conv weight ``(out, in, kh, kw)`` has ``out``
    rows). Each group of rows shares one grid: ``"tensor"`` (all rows), ``"channel"`` (each
    row), or ``"group"`` (``group_size`` consecutive rows, Q-BERT's group-wise quantization:
    Shen et al. 2020, "Q-BERT: Hessian based ultra low precision quantization of BERT").

    A symmetric grid of ``b >= 2`` bits has the levels :math:`s\,q`,
    :math:`q \in \{-L, \dots, L\}`, :math:`L = 2^{b-1} - 1`, :math:`s = \max|w| / L` (the
    restricted range usual for weights); ``b = 1`` is binary, :math:`\pm s` with
    :math:`s = \mathrm{mean}|w|` (Rastegari et al. 2016, XNOR-Net). An asymmetric grid has
    :math:`q \in \{0, \dots, 2^b - 1\}`, :math:`s = (\max - \min) / (2^b - 1)` over the
    range widened to hold 0, and the zero point :math:`z = \mathrm{round}(-\min / s)`, so that
    0 is exact. Rounding is half to even (``torch.round``). A group of zeros gets ``s = 1``.

    Args:
        bits: The default width, 1 to 16 (methods take ``bits=`` to override it).
        granularity: ``"tensor"``, ``"channel"`` or ``"group"``.
        group_size: Rows per group for ``"group"``; must divide each matrix's rows.
        symmetric: Symmetric (True) or asymmetric grid.

    Raises:
        ValueError: bits outside 1-16, an unknown granularity, or a group size below 1.

    Example:
        >>> q = Quantizer(bits=2)
        >>> q.fake(torch.tensor([[0.9, -0.6, 0.2, -1.0]]))  # levels -1, 0, 1 (step max|w| = 1)
        tensor([[ 1., -1.,  0., -1.]])
    """

    bits: int = 4
    granularity: str = "channel"
    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self) -> None:
        check_bits(self.bits, "Quantizer")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"Quantizer: granularity must be one of {GRANULARITIES}, got {self.granularity!r}."
            )
        if self.group_size < 1:
            raise ValueError(f"Quantizer: group_size must be >= 1, got {self.group_size}.")

    def codes(self, W: torch.Tensor, bits: int | None = None, *, name: str = "") -> Codes:
        """The integer codes, steps and zero points of ``W`` (see the class docstring).

        Args:
            W: A weight of at least 2 dimensions.
            bits: Width (default ``self.bits``).
            name: The weight's name, for errors.

        Raises:
            ValueError: ``W`` has fewer than 2 dimensions, or ``group_size`` does not divide
                its rows.
        """
        b = check_bits(self.bits if bits is None else bits, "Quantizer")
        X = self._groups(W, name).double()
        if self.symmetric:
            q, s, z = _symmetric(X, b)
            lo, hi = (-1, 1) if b == 1 else (1 - 2 ** (b - 1), 2 ** (b - 1) - 1)
        else:
            q, s, z = _asymmetric(X, b)
            lo, hi = 0, 2**b - 1
        return Codes(q, s, z, b, W.shape, lo, hi)

    def fake(self, W: torch.Tensor, bits: int | None = None, *, name: str = "") -> torch.Tensor:
        r""":math:`Q(W)`: ``W`` rounded to its grid, in ``W``'s shape and dtype."""
        return self.codes(W, bits, name=name).dequantize().to(W.dtype)

    def error(self, W: torch.Tensor, bits: int | None = None, *, name: str = "") -> float:
        r""":math:`\|Q(W) - W\|_F^2`, of the same :math:`Q(W)` that :meth:`fake` returns."""
        W = W.detach()
        return float(((self.fake(W, bits, name=name) - W).double() ** 2).sum())

    def _groups(self, W: torch.Tensor, name: str) -> torch.Tensor:
        if W.dim() < 2:
            raise ValueError(
                f"Quantizer: {name or 'the weight'} has shape {tuple(W.shape)}; only matrices "
                "and conv kernels (2 or more dimensions) are quantized."
            )
        rows = W.shape[0]
        size = {"tensor": rows, "channel": 1, "group": self.group_size}[self.granularity]
        if rows % size:
            raise ValueError(
                f"Quantizer: group_size={size} does not divide the {rows} rows of "
                f"{name or 'the weight'} {tuple(W.shape)}; choose a divisor of {rows} "
                "(or granularity='channel' / 'tensor')."
            )
        return W.detach().reshape(rows // size, -1)


def _symmetric(X: torch.Tensor, b: int) -> tuple[torch.Tensor, ...]:
    zero = torch.zeros(X.shape[0], 1, dtype=X.dtype, device=X.device)
    if b == 1:
        s = X.abs().mean(1, keepdim=True)
        return torch.where(X >= 0, 1.0, -1.0).to(X.dtype), _nonzero(s), zero
    L = 2 ** (b - 1) - 1
    s = _nonzero(X.abs().amax(1, keepdim=True) / L)
    return torch.round(X / s).clamp(-L, L), s, zero


def _asymmetric(X: torch.Tensor, b: int) -> tuple[torch.Tensor, ...]:
    top = 2**b - 1
    lo = X.amin(1, keepdim=True).clamp(max=0)
    hi = X.amax(1, keepdim=True).clamp(min=0)
    s = _nonzero((hi - lo) / top)
    z = torch.round(-lo / s)
    return torch.round(X / s + z).clamp(0, top), s, z


def _nonzero(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > 0, s, torch.ones_like(s))


def check_bits(bits: int, who: str) -> int:
    """``bits`` as an int, refusing anything outside 1-16."""
    if isinstance(bits, bool) or int(bits) != bits or not 1 <= bits <= 16:
        raise ValueError(
            f"{who}: bits must be integers from 1 to 16, got {bits!r}; use e.g. bits=(2, 4, 8)."
        )
    return int(bits)
