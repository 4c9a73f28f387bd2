r"""Integer codes packed into int32 words as compressed-tensors' ``pack-quantized`` format does.

Element ``i`` of a row occupies bits ``i*b .. i*b+b-1`` of the row's bit stream (little-endian
within each int32 word, elements may straddle two words), stored with the offset
:math:`2^{b-1}` so that signed codes become unsigned; a row takes
:math:`\lceil \text{cols}\, b / 32 \rceil` words (compressed-tensors 0.20's
``pack_to_int32``; for 4 and 8 bits the same as the older 8- and 4-per-word packing).
"""

from __future__ import annotations

import math

import torch


def pack_int32(values: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed codes in :math:`[-2^{b-1}, 2^{b-1})` along ``dim`` of a matrix.

    Args:
        values: ``(rows, cols)`` integer-valued tensor.
        bits: 1 to 8.
        dim: The dimension to pack (1: along rows, 0: along columns, as zero points are).

    Returns:
        int32 tensor, ``(rows, ceil(cols * bits / 32))`` for ``dim=1``.

    Example:
        >>> pack_int32(torch.tensor([[1, -1, 0, 7, -8, 0, 0, 0]]), 4)
        tensor([[-2004813703]], dtype=torch.int32)
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_int32: bits must be 1 to 8, got {bits}.")
    v = values.to(torch.int64)
    v = v.T if dim == 0 else v
    offset = 1 << (bits - 1)
    if int(v.min()) < -offset or int(v.max()) >= offset:
        raise ValueError(f"pack_int32: codes outside [-{offset}, {offset - 1}] for {bits} bits.")
    rows, cols = v.shape
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = (((v + offset)[..., None] >> shifts) & 1).reshape(rows, cols * bits)
    words = math.ceil(cols * bits / 32)
    stream = torch.nn.functional.pad(stream, (0, words * 32 - cols * bits))
    packed = (stream.reshape(rows, words, 32) << torch.arange(32, dtype=torch.int64)).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed.T.contiguous() if dim == 0 else packed
