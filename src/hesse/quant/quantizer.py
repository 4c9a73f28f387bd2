"""Uniform fake-quantization of weight matrices: round-to-nearest on a per-group grid."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..problem._weights import as_rows, from_rows

GRANULARITIES = ("tensor", "channel", "group", "rows")


@dataclass(frozen=True)
class Codes:
    r"""Integer codes of a weight: :math:`W \approx s\,(q - z)` group by group.

    Attributes:
        q: Integer codes, shape ``(groups, weights_per_group)`` (float tensor holding
            integers), in the order of the weight's ``(outputs, inputs)`` rows
            (:func:`hesse.problem._weights.as_rows`).
        scale: ``(groups, 1)`` step sizes :math:`s`.
        zero: ``(groups, 1)`` zero points :math:`z` (0 for a symmetric grid).
        bits: The width of the codes.
        shape: The weight's shape.
        lo: Smallest code.
        hi: Largest code.
        axis: The weight's output axis.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    shape: torch.Size
    lo: int
    hi: int
    axis: int = 0

    def dequantize(self) -> torch.Tensor:
        r""":math:`s\,(q - z)` in the weight's shape (float64)."""
        rows = (self.scale * (self.q - self.zero)).reshape(self.shape[self.axis], -1)
        return from_rows(rows, self.shape, self.axis)

    def project(self, V: torch.Tensor) -> torch.Tensor:
        """Another tensor of the weight's shape rounded to this grid (same steps and zeros)."""
        X = as_rows(V, self.axis).reshape(self.q.shape).double() / self.scale + self.zero
        if self.bits == 1 and self.lo < 0:  # symmetric binary: the two levels are -s and s
            q = torch.where(X >= 0, 1.0, -1.0).to(X.dtype)
        else:
            q = torch.round(X).clamp(self.lo, self.hi)
        rows = (self.scale * (q - self.zero)).reshape(self.shape[self.axis], -1)
        return from_rows(rows, self.shape, self.axis).to(V.dtype)


@dataclass(frozen=True)
class Quantizer:
    r"""Uniform round-to-nearest fake-quantization of weight matrices.

    A weight is seen as ``(outputs, inputs)`` rows, one per output unit along its output axis
    ``axis`` (0 for ``Linear``, ``ConvNd`` and plain matrices; 1 for Hugging Face's ``Conv1D``,
    stored ``(in, out)``: :func:`hesse.problem._weights.output_axis`); a conv kernel's inputs are
    ``(in, *kernel)``. One grid is shared by each group: ``"tensor"`` (the whole weight),
    ``"channel"`` (each output unit), or ``"group"`` (``group_size`` consecutive inputs of one
    output unit, along the reduction dimension, as GPTQ and AWQ group their grids: Frantar et
    al. 2023, "GPTQ: accurate post-training quantization for generative pre-trained
    transformers"), or ``"rows"`` (``group_size`` consecutive output units, Q-BERT's group-wise
    quantization: Shen et al. 2020, "Q-BERT: Hessian based ultra low precision quantization of
    BERT").

    A symmetric grid of ``b >= 2`` bits has the levels :math:`s\,q`,
    :math:`q \in \{-L, \dots, L\}`, :math:`L = 2^{b-1} - 1`, :math:`s = \max|w| / L` (the
    restricted range usual for weights); ``b = 1`` is binary, :math:`\pm s` with
    :math:`s = \mathrm{mean}|w|` (Rastegari et al. 2016, XNOR-Net). An asymmetric grid has
    :math:`q \in \{0, \dots, 2^b - 1\}`, :math:`s = (\max - \min) / (2^b - 1)` over the
    range widened to hold 0, and the zero point :math:`z = \mathrm{round}(-\min / s)`, so that
    0 is exact. Grids are computed in float64; rounding is half to even (``torch.round``). A
    group of zeros gets ``s = 1``.

    Args:
        bits: The default width, 1 to 16 (methods take ``bits=`` to override it).
        granularity: ``"tensor"``, ``"channel"``, ``"group"`` or ``"rows"``.
        group_size: Inputs per group for ``"group"`` (must divide each output unit's inputs);
            output units per group for ``"rows"`` (must divide the output units).
        symmetric: Symmetric (True) or asymmetric grid.

    Raises:
        ValueError: bits outside 1-16, an unknown granularity, or a group size below 1.

    Example:
        >>> q = Quantizer(bits=2)
        >>> q.fake(torch.tensor([[0.9, -0.6, 0.2, -1.0]]))  # levels -1, 0, 1 (step max|w| = 1)
        tensor([[ 1., -1.,  0., -1.]])
        >>> W = torch.tensor([[1.0, 0.4], [-0.6, -0.3], [0.2, 0.3]])  # Conv1D: (in, out)
        >>> q.fake(W, axis=1)  # one grid per column: steps 1.0 and 0.4
        tensor([[ 1.0000,  0.4000],
                [-1.0000, -0.4000],
                [ 0.0000,  0.4000]])
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

    def codes(
        self, W: torch.Tensor, bits: int | None = None, *, name: str = "", axis: int = 0
    ) -> Codes:
        """The integer codes, steps and zero points of ``W`` (see the class docstring).

        Args:
            W: A weight of at least 2 dimensions.
            bits: Width (default ``self.bits``).
            name: The weight's name, for errors.
            axis: ``W``'s output axis (:func:`hesse.problem._weights.output_axis` of its module).

        Raises:
            ValueError: ``W`` has fewer than 2 dimensions, or ``group_size`` does not divide
                the inputs of its output units.
        """
        b = check_bits(self.bits if bits is None else bits, "Quantizer")
        X = self._groups(W, name, axis).double()
        if self.symmetric:
            q, s, z = _symmetric(X, b)
            lo, hi = (-1, 1) if b == 1 else (1 - 2 ** (b - 1), 2 ** (b - 1) - 1)
        else:
            q, s, z = _asymmetric(X, b)
            lo, hi = 0, 2**b - 1
        return Codes(q, s, z, b, W.shape, lo, hi, axis)

    def fake(
        self, W: torch.Tensor, bits: int | None = None, *, name: str = "", axis: int = 0
    ) -> torch.Tensor:
        r""":math:`Q(W)`: ``W`` rounded to its grid, in ``W``'s shape and dtype."""
        return self.codes(W, bits, name=name, axis=axis).dequantize().to(W.dtype)

    def error(
        self, W: torch.Tensor, bits: int | None = None, *, name: str = "", axis: int = 0
    ) -> float:
        r""":math:`\|Q(W) - W\|_F^2` in float64, of the :math:`Q(W)` that :meth:`fake` returns.

        The difference is taken in float64, not in ``W``'s dtype: in bfloat16 it would be
        rounded to 8 significant bits.
        """
        W = W.detach()
        return squared_error(self.fake(W, bits, name=name, axis=axis), W)

    def _groups(self, W: torch.Tensor, name: str, axis: int) -> torch.Tensor:
        if W.dim() < 2:
            raise ValueError(
                f"Quantizer: {name or 'the weight'} has shape {tuple(W.shape)}; only matrices "
                "and conv kernels (2 or more dimensions) are quantized."
            )
        rows = as_rows(W.detach(), axis)
        if self.granularity == "tensor":
            return rows.reshape(1, -1)
        if self.granularity == "rows":
            if rows.shape[0] % self.group_size:
                raise ValueError(
                    f"Quantizer: group_size={self.group_size} does not divide the "
                    f"{rows.shape[0]} output units of {name or 'the weight'} {tuple(W.shape)} "
                    f"(output axis {axis}); choose a divisor of {rows.shape[0]}."
                )
            return rows.reshape(rows.shape[0] // self.group_size, -1)
        size = rows.shape[1] if self.granularity == "channel" else self.group_size
        if rows.shape[1] % size:
            raise ValueError(
                f"Quantizer: group_size={size} does not divide the {rows.shape[1]} inputs per "
                f"output unit of {name or 'the weight'} {tuple(W.shape)} (output axis {axis}); "
                f"choose a divisor of {rows.shape[1]} (or granularity='channel' / 'tensor')."
            )
        return rows.reshape(-1, size)


def squared_error(Q: torch.Tensor, W: torch.Tensor) -> float:
    r""":math:`\|Q - W\|_F^2`, the difference taken in float64."""
    return float(((Q.detach().double() - W.detach().double()) ** 2).sum())


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
