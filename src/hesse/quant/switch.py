"""One model at several bit-widths: quantize once, switch widths by rounding the integer codes."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ._layers import output_axes, quantizable, unknown
from .quantizer import Codes, Quantizer, check_bits, squared_error
from .sensitivity import Sensitivity


@dataclasses.dataclass(frozen=True)
class SwitchStep:
    """A configuration of the switching schedule: widths, size and predicted Ω."""

    bits: dict[str, int]
    size_bytes: float
    predicted: float


class BitSwitch:
    r"""A model quantized once at the highest width, from which every lower width is read.

    Double Rounding (Huang et al. 2024, "Double Rounding: quantization method for
    multi-precision models"): with the codes :math:`q_h`, step :math:`s_h` and zero point
    :math:`z_h` of the highest width :math:`h`, width :math:`b` uses

    .. math:: q_b = \mathrm{clamp}(\mathrm{round}(q_h / 2^{h-b})),\quad
        s_b = 2^{h-b} s_h,\quad z_b = \mathrm{round}(z_h / 2^{h-b}),

    so only the :math:`h`-bit integers are stored (grids along each weight's output axis, as
    :func:`hesse.quant.quantize` has them). Which layers switch down first is decided by
    the Hessian, as in HASB (hessian-aware switchable bit-widths): :meth:`schedule` lowers one
    layer by one width at a time, each time the one whose rise of
    :math:`\Omega_i = \max(s_i, 0)\,\|W_i^{(b)} - W_i\|^2` per byte saved is smallest, with
    :math:`s_i` the scores of ``sens`` and the errors of the switched grids themselves.

    Args:
        model: The network; it is not modified.
        bits: Widths served (>= 2; the highest is the stored one).
        quantizer: The grid of the highest width (default ``Quantizer()``).
        sens: Sensitivities of the layers (for :meth:`schedule`); layers default to its.
        layers: Layer names (default: those of ``sens``, else every quantizable layer).

    Raises:
        ValueError: a width below 2 or above 16, or an unknown layer.
    """

    def __init__(
        self,
        model: nn.Module,
        bits: Sequence[int] = (8, 4, 3, 2),
        *,
        quantizer: Quantizer | None = None,
        sens: Sensitivity | None = None,
        layers: Sequence[str] | None = None,
    ):
        self.bits = tuple(sorted({check_bits(b, "BitSwitch") for b in bits}, reverse=True))
        if self.bits[-1] < 2:
            raise ValueError(
                f"BitSwitch: widths must be at least 2 (1 bit is a sign, not a rounding of the "
                f"codes), got {bits}."
            )
        self.source, self.sens = model, sens
        found = quantizable(model)
        names = layers if layers is not None else (sens.names if sens else list(found))
        for name in names:
            if name not in found:
                raise ValueError(unknown(name, found))
        weights = dict(model.named_parameters())
        self.layers = {n: found[n] for n in names}
        axes = output_axes(model, self.layers)
        quantizer = quantizer or Quantizer()
        self.codes = {
            n: quantizer.codes(weights[p], self.bits[0], name=n, axis=axes[n])
            for n, p in self.layers.items()
        }
        self.dtypes = {n: weights[p].dtype for n, p in self.layers.items()}
        self.delta_sq = {
            n: {b: squared_error(self.weight(n, b), weights[p]) for b in self.bits}
            for n, p in self.layers.items()
        }

    def weight(self, layer: str, bits: int) -> torch.Tensor:
        """The weight of ``layer`` at width ``bits``, read from the stored codes, in its dtype."""
        if bits not in self.bits:
            raise ValueError(f"BitSwitch: width {bits} is not served; widths: {self.bits}.")
        return _switch(self.codes[layer], bits).dequantize().to(self.dtypes[layer])

    def model(self, bits: int | Mapping[str, int]) -> nn.Module:
        """A fake-quantized copy at one width for every layer, or at ``{layer: bits}``."""
        chosen = {n: bits for n in self.layers} if isinstance(bits, int) else dict(bits)
        out = copy.deepcopy(self.source)
        weights = dict(out.named_parameters())
        with torch.no_grad():
            for name, b in chosen.items():
                if name not in self.layers:
                    raise ValueError(unknown(name, self.layers))
                p = weights[self.layers[name]]
                p.copy_(self.weight(name, b))
        return out

    def schedule(self) -> list[SwitchStep]:
        """Configurations from every layer at the highest width down to every layer at the lowest.

        Raises:
            ValueError: the switch was built without ``sens``.
        """
        if self.sens is None:
            raise ValueError("BitSwitch.schedule: build the switch with sens=sensitivity(...).")
        score = {n: max(self.sens[n].score, 0.0) for n in self.layers}
        size = {n: self.sens[n].n_params / 8 for n in self.layers}
        level = {n: 0 for n in self.layers}  # index into self.bits
        steps = [self._step(level, score, size)]
        while any(i < len(self.bits) - 1 for i in level.values()):
            n = min(
                (n for n, i in level.items() if i < len(self.bits) - 1),
                key=lambda n: self._rise(n, level[n], score, size),
            )
            level[n] += 1
            steps.append(self._step(level, score, size))
        return steps

    def _rise(self, name: str, i: int, score: dict, size: dict) -> float:
        hi, lo = self.bits[i], self.bits[i + 1]
        d = self.delta_sq[name]
        return score[name] * (d[lo] - d[hi]) / (size[name] * (hi - lo))

    def _step(self, level: dict, score: dict, size: dict) -> SwitchStep:
        bits = {n: self.bits[i] for n, i in level.items()}
        omega = sum(score[n] * self.delta_sq[n][b] for n, b in bits.items())
        return SwitchStep(bits, sum(size[n] * b for n, b in bits.items()), omega)


def _switch(codes: Codes, bits: int) -> Codes:
    """The codes of width ``bits`` obtained by rounding the stored codes (Double Rounding)."""
    k = 2 ** (codes.bits - bits)
    signed = codes.lo < 0
    lo, hi = (1 - 2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    q, zero = torch.round(codes.q / k).clamp(lo, hi), torch.round(codes.zero / k)
    return dataclasses.replace(
        codes, q=q, scale=codes.scale * k, zero=zero, bits=bits, lo=lo, hi=hi
    )
