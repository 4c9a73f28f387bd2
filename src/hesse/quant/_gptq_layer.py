r"""GPTQ on one layer: the OBS column sweep that rounds each weight to its group's grid.

Frantar, Ashkboos, Hoefler & Alistarh 2023, "GPTQ: Accurate post-training quantization for
generative pre-trained transformers" (ICLR). For :math:`Y = W X` the layer objective is
:math:`\|(W - \hat W) X\|_F^2 = \tfrac n2 \mathrm{tr}\big((W - \hat W) H (W - \hat W)^\top\big)`,
:math:`H = 2 X X^\top / n`, the same Hessian for every output row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linalg._cholesky import inverse_cholesky
from ..problem._weights import as_rows
from .quantizer import Codes, Quantizer, check_bits


@dataclass(frozen=True)
class GptqLayerResult:
    r"""The quantized weight of :func:`gptq_layer` and what it cost.

    Attributes:
        codes: Integer codes, scales and zero points (:class:`Codes`, one group per row of
            ``codes.q``; groups in the weight's original column order).
        weight: :math:`\hat W = s\,(q - z)`, the shape and dtype of ``W``.
        error: :math:`\mathrm{tr}\big((W - \hat W) H (W - \hat W)^\top\big)` of the returned
            weight, i.e. :math:`2 \|(W - \hat W) X\|_F^2 / n`.
        rtn_error: The same for round-to-nearest on the same grid.
        rule: ``"gptq"``, or ``"rtn"`` when round-to-nearest had the smaller error and was
            returned instead (the sweep minimizes the *damped* objective, and with
            ``act_order`` the grids are fixed before the sweep, so on a few layers it loses).
        damping: Absolute damping :math:`\lambda` added to the diagonal of :math:`H`.
        relative_damping: :math:`\lambda / \mathrm{mean}\,\mathrm{diag}\,H`, larger than asked
            when the Cholesky factorization needed more.
    """

    codes: Codes
    weight: torch.Tensor
    error: float
    rtn_error: float
    rule: str
    damping: float
    relative_damping: float


def gptq_layer(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = True,
    act_order: bool = True,
    damping: float = 0.01,
    block: int = 128,
    axis: int = 0,
    scale_dtype: torch.dtype = torch.float32,
    full_range: bool = True,
) -> GptqLayerResult:
    r"""Quantize one layer's weight by GPTQ (Frantar et al. 2023).

    The columns (inputs) are visited in order (by decreasing :math:`H_{qq}` with
    ``act_order``); each column is rounded to its group's grid and its error spread over the
    columns not yet visited,
    :math:`W_{:, q:} \mathrel{-}= \frac{w_{:q} - \hat w_{:q}}{U_{qq}} U_{q, q:}`, with :math:`U`
    the upper Cholesky factor of :math:`(H + \lambda I)^{-1}`,
    :math:`\lambda = \text{damping} \cdot \mathrm{mean}\,\mathrm{diag}\,H` (raised tenfold until
    the factorization succeeds). Updates are applied lazily, ``block`` columns at a time.

    Groups are ``group_size`` consecutive inputs of the ORIGINAL column order, so the
    checkpoint needs no group index (compressed-tensors 0.20 stores none). Without
    ``act_order`` each group's grid is computed when the sweep enters the group, on the weights
    updated so far (the paper). With ``act_order`` the columns of a group are visited out of
    order, so all grids are computed from ``W`` before the sweep (llm-compressor's
    ``actorder="weight"``, AutoGPTQ's ``static_groups``). Scales are rounded to
    ``scale_dtype``, the dtype they are stored in, so that a reloaded checkpoint computes the
    same weights. Round-to-nearest on the same grid is returned instead when its exact error
    is smaller (``rule="rtn"``): the result is never worse than round-to-nearest.

    Args:
        W: The weight; ``axis`` holds the output units, the other axes flattened are the inputs.
        H: ``(in, in)`` input Hessian :math:`2 X X^\top / n`.
        bits: Code width, 2 to 16.
        group_size: Inputs per group (must divide the inputs), or None for one grid per output.
        symmetric: Symmetric grid or asymmetric (with zero points).
        act_order: Visit columns by decreasing :math:`H_{qq}`.
        damping: :math:`\lambda` relative to :math:`\mathrm{mean}\,\mathrm{diag}\,H`, > 0.
        block: Columns per lazy update block.
        axis: The output axis of ``W``.
        scale_dtype: The dtype the scales are stored in.
        full_range: Symmetric grids with all :math:`2^b` codes :math:`-2^{b-1}..2^{b-1}-1` and
            step :math:`\max|w| / (2^{b-1} - \tfrac12)` (compressed-tensors' and
            llm-compressor's symmetric grid; the default) instead of :math:`-L..L`,
            :math:`L = 2^{b-1} - 1`, step :math:`\max|w|/L` (False: hesse's narrow grid).

    Returns:
        :class:`GptqLayerResult`.

    Raises:
        ValueError: shapes that do not match, bits outside 1-16, a group size that does not
            divide the inputs, damping <= 0.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> X = torch.randn(16, 256, dtype=torch.float64)
        >>> W = torch.randn(8, 16, dtype=torch.float64)
        >>> r = gptq_layer(W, 2 * X @ X.T / 256, bits=3, group_size=8)
        >>> r.error <= r.rtn_error, r.codes.q.shape
        (True, torch.Size([16, 8]))
    """
    shape, dtype = W.shape, W.dtype
    W = as_rows(W.detach(), axis).to(torch.float64)
    grid = _grid(W, H, bits, group_size, symmetric)
    full = full_range and symmetric
    H = H.detach().to(torch.float64)
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else None
    Hp = H if perm is None else H[perm][:, perm]
    U, lam, rho, _ = inverse_cholesky(Hp, damping, Hp.diagonal() != 0, "gptq")
    rtn = _rounded(grid.codes(W, axis=0), W.shape[0], scale_dtype, full)
    swept = _sweep(W, U, grid, rtn, perm, block, scale_dtype, full)
    lo, hi = _range(grid, full)
    q_rtn = torch.round(W / _expand(rtn[0], grid) + _expand(rtn[1], grid)).clamp(lo, hi)
    candidates = [(_error(W, H, _dequant(q, sz[0], sz[1], grid)), rule, q, sz)
                  for rule, q, sz in (("gptq", *swept), ("rtn", q_rtn, rtn))]  # fmt: skip
    error, rule, q, (scale, zero) = min(candidates, key=lambda c: c[0])
    codes = _codes(q, scale, zero, grid, shape, axis, full)
    weight = codes.dequantize().to(dtype)
    return GptqLayerResult(codes, weight, error, candidates[1][0], rule, lam, rho)


def _grid(W: torch.Tensor, H: torch.Tensor, bits: int, group: int | None, sym: bool) -> Quantizer:
    if check_bits(bits, "gptq") < 2:
        raise ValueError("gptq: bits must be >= 2 (a 1-bit grid has no zero level to round to).")
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(
            f"gptq: H must be ({W.shape[1]}, {W.shape[1]}) for a weight of {W.shape[1]} inputs "
            f"per output unit, got {tuple(H.shape)}."
        )
    if group is not None and (group < 1 or W.shape[1] % group):
        raise ValueError(
            f"gptq: group_size={group} must divide the {W.shape[1]} inputs per output unit; "
            "choose a divisor, or group_size=None for one grid per output unit."
        )
    if group is None:
        return Quantizer(bits, "channel", symmetric=sym)
    return Quantizer(bits, "group", group_size=group, symmetric=sym)


def _rounded(codes: Codes, rows: int, dtype: torch.dtype, full: bool = False):
    """``(scale, zero)`` as ``(rows, groups)``, scales rounded to their storage dtype."""
    scale = codes.scale.reshape(rows, -1)
    if full:  # max|w| / L -> max|w| / (L + 1/2)
        L = -codes.lo
        scale = scale * L / (L + 0.5)
    scale = scale.to(dtype).to(torch.float64)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, codes.zero.reshape(rows, -1)


def _range(grid: Quantizer, full: bool = False) -> tuple[int, int]:
    b = grid.bits
    if full:
        return -(2 ** (b - 1)), 2 ** (b - 1) - 1
    if not grid.symmetric:
        return 0, 2**b - 1
    return (-1, 1) if b == 1 else (1 - 2 ** (b - 1), 2 ** (b - 1) - 1)


def _expand(t: torch.Tensor, grid: Quantizer) -> torch.Tensor:
    """``(rows, groups)`` to ``(rows, inputs)``: each group's value on its columns."""
    size = grid.group_size if grid.granularity == "group" else None
    return t if size is None else t.repeat_interleave(size, dim=1)


def _dequant(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Quantizer):
    return _expand(scale, grid) * (q - _expand(zero, grid))


def _sweep(W, U, grid, grid0, perm, block, scale_dtype, full):
    """``(codes, (scale, zero))`` after the GPTQ sweep, codes in the original column order."""
    n = W.shape[1]
    order = perm if perm is not None else torch.arange(n)
    size = grid.group_size if grid.granularity == "group" else n
    lo, hi = _range(grid, full)
    scale, zero = grid0[0].clone(), grid0[1].clone()
    W = W[:, order].clone()
    Q = torch.zeros_like(W)
    for start in range(0, n, block):
        stop = min(start + block, n)
        Err = torch.zeros(W.shape[0], stop - start, dtype=W.dtype)
        for j in range(start, stop):
            g = int(order[j]) // size
            if perm is None and j % size == 0:  # the paper: the grid on entering a group
                fresh = grid.codes(_current(W, Err, U, start, j, stop, size), axis=0)
                fresh_grid = _rounded(fresh, W.shape[0], scale_dtype, full)
                scale[:, g : g + 1], zero[:, g : g + 1] = fresh_grid
            s, z = scale[:, g], zero[:, g]
            Q[:, j] = torch.round(W[:, j] / s + z).clamp(lo, hi)
            err = (W[:, j] - s * (Q[:, j] - z)) / U[j, j]
            W[:, j:stop] -= err[:, None] * U[j, j:stop][None, :]
            Err[:, j - start] = err
        W[:, stop:] -= Err @ U[start:stop, stop:]
    out = torch.empty_like(Q)
    out[:, order] = Q
    return out, (scale, zero)


def _current(W, Err, U, start: int, j: int, stop: int, size: int) -> torch.Tensor:
    """Columns ``j:j+size`` with the updates still pending for the columns past the block."""
    cols = W[:, j : j + size].clone()
    if j + size > stop:  # the lazy updates of columns start..j-1 have not reached them yet
        cols[:, stop - j :] -= Err[:, : j - start] @ U[start:j, stop : j + size]
    return cols


def _error(W: torch.Tensor, H: torch.Tensor, W_hat: torch.Tensor) -> float:
    D = W - W_hat
    return float(torch.einsum("ri,ij,rj->", D, H, D))


def _codes(q, scale, zero, grid: Quantizer, shape: torch.Size, axis: int, full: bool) -> Codes:
    lo, hi = _range(grid, full)
    groups = scale.numel()
    return Codes(
        q.reshape(groups, -1), scale.reshape(-1, 1), zero.reshape(-1, 1), grid.bits, shape,
        lo, hi, axis,
    )  # fmt: skip
