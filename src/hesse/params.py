"""Which parameters are analysed, and how flat vectors map onto them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class ParamSpace:
    """Named parameter shapes laid out in one flat vector of length ``dim``.

    Public vectors in hesse are flat: ``(d,)`` for one vector, ``(d, k)`` for ``k`` vectors.
    Only this class converts between that layout and per-parameter tensors.

    Args:
        names: Parameter names, in the order of the flat layout.
        shapes: One shape per name.

    Example:
        >>> space = ParamSpace(["w", "b"], [(2, 3), (2,)])
        >>> space.dim
        8
        >>> space.split(torch.arange(8.0))["b"]
        tensor([6., 7.])
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]]):
        if len(names) != len(shapes):
            raise ValueError(f"ParamSpace: {len(names)} names but {len(shapes)} shapes.")
        self.names = list(names)
        self.shapes = [torch.Size(s) for s in shapes]
        self.numels = [math.prod(s) for s in self.shapes]
        self.dim = sum(self.numels)

    @classmethod
    def from_named(cls, named: dict[str, torch.Tensor]) -> ParamSpace:
        """Build the space of a ``{name: tensor}`` dictionary, in its order."""
        return cls(list(named), [t.shape for t in named.values()])

    def slices(self) -> dict[str, slice]:
        """Each parameter's slice of the flat vector."""
        out, start = {}, 0
        for name, n in zip(self.names, self.numels, strict=True):
            out[name] = slice(start, start + n)
            start += n
        return out

    def split(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat ``(d,)`` or ``(d, k)`` to per-parameter ``shape`` or ``(k, *shape)`` tensors."""
        self._check(v)
        if v.dim() == 1:
            parts = torch.split(v, self.numels)
            return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}
        # contiguous copies, made once per product: strided views would be gathered again by
        # every batch's backward pass
        parts = torch.split(v.T.contiguous(), self.numels, dim=1)
        k = v.shape[1]
        return {
            n: p.reshape(k, *s).contiguous()
            for n, p, s in zip(self.names, parts, self.shapes, strict=True)
        }

    def join(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`split`: to ``(d,)`` or, from ``(k, *shape)`` tensors, ``(d, k)``."""
        first = tensors[self.names[0]]
        if first.dim() == len(self.shapes[0]):
            return torch.cat([tensors[n].reshape(-1) for n in self.names])
        k = first.shape[0]
        return torch.cat([tensors[n].reshape(k, -1) for n in self.names], dim=1).T

    def blocks(self, by: str = "param") -> dict[str, list[str]]:
        """Group parameter names into blocks, per ``"param"`` or per ``"module"``.

        A parameter's module is its name without the last dotted component
        (``"encoder.0.weight"`` belongs to ``"encoder.0"``); top-level parameters form ``"(root)"``.
        """
        if by == "param":
            return {n: [n] for n in self.names}
        if by != "module":
            raise ValueError(f"blocks(by={by!r}): expected 'param' or 'module'.")
        out: dict[str, list[str]] = {}
        for n in self.names:
            out.setdefault(n.rpartition(".")[0] or "(root)", []).append(n)
        return out

    def select(self, names: Sequence[str]) -> list[str]:
        """Resolve parameter names or module prefixes to parameter names, in layout order."""
        names = [names] if isinstance(names, str) else list(names)
        chosen = set()
        for want in names:
            hits = [n for n in self.names if n == want or n.startswith(want + ".")]
            if not hits:
                raise ValueError(
                    f"restrict: {want!r} is neither a parameter nor a module prefix; "
                    f"available parameters: {', '.join(self.names)}."
                )
            chosen.update(hits)
        return [n for n in self.names if n in chosen]

    def subspace(self, names: Sequence[str]) -> ParamSpace:
        """The space of a subset of the parameters (names as returned by :meth:`select`)."""
        shape = dict(zip(self.names, self.shapes, strict=True))
        return ParamSpace(names, [shape[n] for n in names])

    def _check(self, v: torch.Tensor) -> None:
        if v.dim() not in (1, 2) or v.shape[0] != self.dim:
            raise ValueError(
                f"expected a flat vector of shape ({self.dim},) or ({self.dim}, k), "
                f"got {tuple(v.shape)}."
            )
