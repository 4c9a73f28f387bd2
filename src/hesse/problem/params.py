"""Which parameters are analysed, and how flat vectors map onto them."""

from __future__ import annotations

import difflib
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch

from ._blocks import module_prefixes, transformer_blocks

_GLOB = frozenset("*?[")
_REST = "(rest)"  # the block of the parameters in no user group
_ROOT = "(root)"  # the module block of the model's own (top-level) parameters


class ParamSpace:
    """Named parameter shapes laid out in one flat vector of length ``dim``.

    Public vectors in hesse are flat: ``(d,)`` for one vector, ``(d, k)`` for ``k`` vectors.
    Only this class converts between that layout and per-parameter tensors.

    Args:
        names: Parameter names, in the order of the flat layout.
        shapes: One shape per name.
        aliases: Other names of the same parameters (``{alias: name}``), e.g. the output layer
            of a language model whose weight is tied to the input embedding; :meth:`select`
            accepts them.
        shard: For the local shards of parameters split across processes (FSDP), the
            ``Shard`` that maps them into the full layout; None otherwise. Inner products of
            such vectors are sums over the processes.

    Example:
        >>> space = ParamSpace(["w", "b"], [(2, 3), (2,)])
        >>> space.dim
        8
        >>> space.split(torch.arange(8.0))["b"]
        tensor([6., 7.])
    """

    def __init__(
        self,
        names: Sequence[str],
        shapes: Sequence[Sequence[int]],
        aliases: Mapping[str, str] | None = None,
        *,
        shard: Any = None,
    ):
        if len(names) != len(shapes):
            raise ValueError(f"ParamSpace: {len(names)} names but {len(shapes)} shapes.")
        self.names = list(names)
        self.aliases = dict(aliases or {})
        self.shapes = [torch.Size(s) for s in shapes]
        self.numels = [math.prod(s) for s in self.shapes]
        self.dim = sum(self.numels)
        self.shard = shard

    @classmethod
    def from_named(
        cls, named: Mapping[str, torch.Tensor], aliases: Mapping[str, str] | None = None
    ) -> ParamSpace:
        """Build the space of a ``{name: tensor}`` dictionary, in its order."""
        return cls(list(named), [t.shape for t in named.values()], aliases)

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

    def blocks(
        self, by: str = "param", groups: Mapping[str, str | Sequence[str]] | None = None
    ) -> dict[str, list[str]]:
        """Group the parameter names into named blocks (the diagonal blocks of an operator).

        - ``by="param"``: one block per parameter.
        - ``by="module"``: per module, a parameter's name without its last component
          (``"encoder.0.weight"`` belongs to ``"encoder.0"``); top-level parameters form
          ``"(root)"``.
        - ``by="block"``: per transformer sub-layer, ``"<layer>.attention"`` and
          ``"<layer>.mlp"`` of each layer of the common Hugging Face layouts, and the
          embeddings, final norm and head by module (their shortest module prefix that holds no
          layer: ``"bert.embeddings"``, ``"lm_head"``); a model without transformer layers
          gets one block per top-level module.
        - ``groups={"name": entries}``: the user's blocks, in the mapping's order. Entries are
          what :meth:`select` takes (names, module prefixes, glob patterns). The parameters in
          no group form one last block ``"(rest)"`` (absent when every parameter is in a
          group), so the blocks always cover the space; ``by`` is not used then.

        Raises:
            ValueError: an unknown ``by``; a group that is empty, matches nothing or is named
                ``"(rest)"``; or a parameter in two groups (the message names both).

        Example:
            >>> space = ParamSpace(["h.0.attn.w", "h.0.mlp.w", "h.1.attn.w", "head.w"], [(1,)] * 4)
            >>> space.blocks(by="block")["h.1.attention"]
            ['h.1.attn.w']
            >>> space.blocks(groups={"attention": "*.attn"})
            {'attention': ['h.0.attn.w', 'h.1.attn.w'], '(rest)': ['h.0.mlp.w', 'head.w']}
        """
        if groups is not None:
            return self._groups(groups)
        if by == "param":
            return {n: [n] for n in self.names}
        if by == "block":
            return transformer_blocks(self.names)
        if by != "module":
            raise ValueError(
                f"blocks(by={by!r}): expected 'param', 'module' or 'block' (or groups=)."
            )
        out: dict[str, list[str]] = {}
        for n in self.names:
            out.setdefault(n.rpartition(".")[0] or _ROOT, []).append(n)
        return out

    def _groups(self, groups: Mapping[str, str | Sequence[str]]) -> dict[str, list[str]]:
        """User blocks: each group's matches in layout order, then the rest."""
        if not groups:
            raise ValueError("blocks(groups=): no group given; pass {name: [names or patterns]}.")
        owner: dict[str, str] = {}
        out: dict[str, list[str]] = {}
        for group, entries in groups.items():
            if group == _REST:
                raise ValueError(
                    f"blocks(groups=): {_REST!r} names the parameters in no group; call the "
                    "group something else."
                )
            if not entries:
                raise ValueError(f"blocks(groups=): group {group!r} has no entries.")
            try:
                out[group] = self.select(entries)
            except ValueError as err:
                raise ValueError(f"blocks(groups=): group {group!r}: {err}") from None
            for n in out[group]:
                if n in owner:
                    raise ValueError(
                        f"blocks(groups=): parameter {n!r} is in group {owner[n]!r} and in group "
                        f"{group!r}; a parameter may be in one group only. Narrow the patterns "
                        "(e.g. 'encoder.layer.0.*' rather than 'encoder.*')."
                    )
                owner[n] = group
        rest = [n for n in self.names if n not in owner]
        return out | ({_REST: rest} if rest else {})

    def select(self, names: str | Sequence[str], *, others: Sequence[str] = ()) -> list[str]:
        """Resolve parameter names, module prefixes and glob patterns, in layout order.

        An entry selects the parameters whose name (or alias) equals it, starts with it
        followed by a dot (a module prefix: ``"encoder.layer.5"``), or, when it holds ``*``,
        ``?`` or ``[``, matches it as a glob pattern (:func:`fnmatch.fnmatchcase`, where ``*``
        also crosses dots), by itself or followed by ``".*"`` (``"encoder.layer.*.attention"``).

        Args:
            names: One entry or several; the union of their matches is returned.
            others: Names outside this space (frozen or not analysed), named in the error when
                an entry matches only those.

        Raises:
            ValueError: an entry matches nothing; the message names close matches and the
                top-level modules, never the whole list.

        Example:
            >>> space = ParamSpace(["enc.0.w", "enc.1.w", "head.w"], [(2,), (2,), (1,)])
            >>> space.select(["head", "enc.*.w"])
            ['enc.0.w', 'enc.1.w', 'head.w']
        """
        wants = [names] if isinstance(names, str) else list(names)
        chosen: set[str] = set()
        for want in wants:
            hits = self._hits(want)
            if not hits:
                raise ValueError(self._no_match(want, others))
            chosen |= hits
        return [n for n in self.names if n in chosen]

    def _hits(self, want: str) -> set[str]:
        hits = {n for n in self.names if _matches(n, want)}
        present = set(self.names)
        return hits | {n for a, n in self.aliases.items() if n in present and _matches(a, want)}

    def _no_match(self, want: str, others: Sequence[str]) -> str:
        outside = [n for n in others if _matches(n, want)]
        if outside:
            return (
                f"{want!r} matches only parameters that are frozen or not analysed here "
                f"({_shorten(outside, 5)}); unfreeze them with requires_grad_(True), or select "
                "them when the Objective is built."
            )
        prefixes = {p for n in self.names for p in module_prefixes(n)}
        candidates = sorted(set(self.names) | set(self.aliases) | prefixes)
        close = difflib.get_close_matches(want, candidates, n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(map(repr, close))}; " if close else ""
        top = Counter(n.split(".")[0] for n in self.names)
        modules = _shorten([f"{m} ({k} tensors)" for m, k in top.items()], 12)
        return (
            f"{want!r} matches no analysed parameter; {hint}top-level modules: {modules}. "
            "Select with parameter names, module prefixes ('encoder.layer.5') or glob "
            "patterns ('encoder.layer.5.*')."
        )

    def subspace(self, names: Sequence[str]) -> ParamSpace:
        """The space of a subset of the parameters (names as returned by :meth:`select`)."""
        if self.shard is not None:
            return self.shard.subset(names).space
        shape = dict(zip(self.names, self.shapes, strict=True))
        return ParamSpace(names, [shape[n] for n in names], self.aliases)

    def _check(self, v: torch.Tensor) -> None:
        if v.dim() not in (1, 2) or v.shape[0] != self.dim:
            raise ValueError(
                f"expected a flat vector of shape ({self.dim},) or ({self.dim}, k), "
                f"got {tuple(v.shape)}."
            )


def _matches(name: str, want: str) -> bool:
    if _GLOB.intersection(want):
        return fnmatchcase(name, want) or fnmatchcase(name, want + ".*")
    return name == want or name.startswith(want + ".")


def _shorten(items: Sequence[str], most: int) -> str:
    shown = ", ".join(items[:most])
    return shown + (f", ... ({len(items) - most} more)" if len(items) > most else "")
