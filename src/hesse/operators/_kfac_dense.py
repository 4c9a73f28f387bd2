r"""The exact blocks of the groups no Kronecker factor covers, all built in one data pass.

KFAC and EKFAC keep the exact curvature block :math:`C_{gg}` of every parameter group that
no Kronecker factor covers (LayerNorm, RMSNorm, embeddings' and other modules' parameters).
Here one operator of the same curvature is restricted to the union :math:`U` of those groups
and each batch is linearized once (:class:`~hesse.operators._autograd.Linearization`) for all
groups; of each group only its diagonal block is formed, from the outputs' tangents
:math:`J_b e_i` of its own columns (one backward through the kept graph of
:math:`J^\top u`, as deep as the group, per column):

* GGN (``kind="exact"``): :math:`(C_{gg})_{ij} = \frac1W \sum_b \langle J_b e_i,
  H_b J_b e_j \rangle` (Schraudolph 2002), one matrix product of the kept tangents when
  they fit ``max_bytes``, else one :math:`J^\top` product per column as the operator does.
* Fisher (``"empirical"``, ``"mc"``): with :math:`c_{in} = \langle r_n, (J_b e_i)_n\rangle`
  for each output row :math:`n` and its loss gradient :math:`r_n`,
  :math:`C_{gg} = \frac1W \sum_b c\,c^\top` (averaged over the draws). The rows of
  :math:`c^\top` are the per-row gradients :math:`J_n^\top r_n` restricted to :math:`U`,
  so a batch with fewer non-zero rows than :math:`d_U` gets them from one backward per row
  instead.

The numbers are those of ``GGNOperator``/``FisherOperator`` of each group's restriction,
densified (to rounding), at the cost of one column's jvp (not a jvp and a vjp) and one
forward pass per batch for all groups.
"""

from __future__ import annotations

import math

import torch
from torch.func import vmap

from ..problem.objective import Objective
from ._autograd import Linearization, backward_columns, second_order
from ._kfac_blocks import DenseBlock
from ._kfac_layers import Group
from .gauss_newton import FisherOperator, GGNOperator

BLOCK_SIZE = 64
"""Most columns (or rows) per chunk of products."""
MAX_BYTES = 2**28
"""Largest kept tangents of one group's columns on one batch (GGN)."""


def dense_blocks(
    objective: Objective,
    groups: list[Group],
    kind: str,
    *,
    mc_samples: int = 1,
    seed: int = 0,
    block_size: int = BLOCK_SIZE,
    max_bytes: int = MAX_BYTES,
    per_row: bool | None = None,
) -> dict[int, DenseBlock]:
    r"""The exact (symmetrized) blocks of the dense groups, by their index in ``groups``.

    Args:
        objective: The (unsharded) objective.
        groups: All groups (:func:`find_groups`); those with ``dense`` get a block.
        kind: ``"exact"`` (the GGN, PSD) or a Fisher kind (``"empirical"``, ``"mc"``).
        mc_samples: Draws per sample of the ``"mc"`` Fisher.
        seed: Seed of its draws.
        block_size: Columns (or rows) per chunk of products.
        max_bytes: Largest kept tangents ``(d_g, *outputs)`` of a group on one batch (GGN);
            above it each column takes a second (vjp) product instead.
        per_row: Fisher: the per-row gradients (True) or the columns' tangents (False);
            default: per row on a batch with fewer non-zero rows than :math:`d_U`.

    Returns:
        ``{index: DenseBlock}`` whose ``matrix`` ``(d_g, d_g)`` is :math:`(C_{gg} +
        C_{gg}^\top)/2` in the flat layout of the group's names.
    """
    dense = [gi for gi, g in enumerate(groups) if g.dense]
    if not dense:
        return {}
    sub = objective.restrict([n for gi in dense for n in groups[gi].names])
    op = _curvature(sub, kind, mc_samples, seed)
    rows = _rows(sub)
    index = [torch.cat([rows[n] for n in groups[gi].names]) for gi in dense]
    names = [groups[gi].names for gi in dense]
    work = _Work(sub, names, index, block_size, max_bytes, per_row)
    name = type(op).__name__

    def term(i: int, batch) -> tuple[torch.Tensor, float]:
        with second_order(name):
            state = op._state(i, batch, op._graph(batch))
            mats = work.fisher(state[0], state[1]) if kind != "exact" else work.ggn(*state[:2])
        return torch.cat([M.reshape(-1) for M in mats]), state[2]

    flat = sub.accumulate(term, shards=True)
    mats = torch.split(flat, [i.numel() ** 2 for i in index])
    return {
        gi: _block(objective, groups[gi], M.reshape(i.numel(), i.numel()))
        for gi, M, i in zip(dense, mats, index, strict=True)
    }


class _Work:
    """The products of one batch: tangents of a group's columns, per-row gradients."""

    def __init__(self, sub: Objective, names, index, block_size, max_bytes, per_row):
        self.sub, self.names, self.index = sub, names, index
        self.block_size, self.max_bytes, self.per_row = block_size, max_bytes, per_row

    def _tangents(self, lin: Linearization, g: int):
        """Chunks ``(k, *f.shape)`` of :math:`J e_i` for the columns ``i`` of group ``g``."""
        idx, sub = self.index[g], self.sub
        live = [n for n in self.names[g] if n in lin.JTu]  # others do not reach the outputs
        for start in range(0, idx.numel(), self.block_size):
            cols = idx[start : start + self.block_size]
            E = torch.zeros(sub.dim, cols.numel(), dtype=sub.dtype, device=sub.device)
            E[cols, torch.arange(cols.numel())] = 1
            if not live:
                yield cols, lin.f.new_zeros((cols.numel(), *lin.f.shape))
                continue
            V = sub.space.split(E)
            out = backward_columns([lin.JTu[n] for n in live], {"u": lin.u}, [V[n] for n in live])
            yield cols, out["u"]

    def ggn(self, lin: Linearization, hessian_out) -> list[torch.Tensor]:
        r"""The batch's sum-form blocks :math:`(J e_i)^\top H_b (J e_j)`, ``(d_g, d_g)`` each."""
        mats = []
        for g, idx in enumerate(self.index):
            keep = 2 * idx.numel() * lin.f.numel() * lin.f.element_size() <= self.max_bytes
            JVs, HJVs, cols_out = [], [], []
            for _, JV in self._tangents(lin, g):
                HJV = vmap(lambda u: hessian_out(u)[0])(JV)
                if keep:
                    JVs.append(JV.reshape(JV.shape[0], -1))
                    HJVs.append(HJV.reshape(HJV.shape[0], -1))
                else:  # J^T H J e_i, the group's rows
                    cols_out.append(self._flat(lin.vjp(HJV), g))
            mats.append(torch.cat(JVs) @ torch.cat(HJVs).T if keep else torch.cat(cols_out))
        return mats

    def fisher(self, lin: Linearization, rs: list[torch.Tensor]) -> list[torch.Tensor]:
        r"""The batch's sum-form blocks :math:`c^\top c` (``c`` ``(n, d_g)``), mean over ``rs``."""
        d = self.sub.dim
        mats = [lin.f.new_zeros((i.numel(), i.numel())) for i in self.index]
        for r in rs:
            n = r.shape[0]
            nonzero = (r.reshape(n, -1) != 0).any(1).nonzero()[:, 0]
            by_row = nonzero.numel() < d if self.per_row is None else self.per_row
            if by_row:  # c^T row by row: the per-row gradients
                C = self._per_row(lin, r, nonzero)
                parts = [C[:, i] for i in self.index]
            else:
                parts = [self._coefficients(lin, r, g) for g in range(len(self.index))]
            for M, P in zip(mats, parts, strict=True):
                M += P.T @ P
        return [M / len(rs) for M in mats]

    def _coefficients(self, lin: Linearization, r: torch.Tensor, g: int) -> torch.Tensor:
        r"""``(n, d_g)``: :math:`c_{in} = \langle r_n, (J e_i)_n\rangle` for group ``g``."""
        chunks = []
        for _, JV in self._tangents(lin, g):
            k, n = JV.shape[:2]
            chunks.append((r * JV).reshape(k, n, -1).sum(-1))
        return torch.cat(chunks).T

    def _per_row(self, lin: Linearization, r: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        r"""``(m, d_U)``: :math:`J_n^\top r_n` for the ``m`` given rows (the zero rows left out)."""
        C = r.new_empty((rows.numel(), self.sub.dim))
        step = max(1, min(self.block_size, 2**24 // max(1, r.numel())))
        for start in range(0, rows.numel(), step):
            chunk = rows[start : start + step]
            Z = r.new_zeros((chunk.numel(), *r.shape))
            Z[torch.arange(chunk.numel()), chunk] = r[chunk]
            C[start : start + chunk.numel()] = self.sub.space.join(lin.vjp(Z)).T
        return C

    def _flat(self, parts: dict, g: int) -> torch.Tensor:
        k = next(iter(parts.values())).shape[0]
        return torch.cat([parts[n].reshape(k, -1) for n in self.names[g]], 1)


def _curvature(sub: Objective, kind: str, mc_samples: int, seed: int):
    if kind == "exact":
        return GGNOperator(sub, psd=True, max_cache_bytes=0)
    return FisherOperator(sub, kind, mc_samples=mc_samples, seed=seed, max_cache_bytes=0)


def _rows(sub: Objective) -> dict[str, torch.Tensor]:
    """The coordinates of each parameter in the flat layout of ``sub.space``."""
    out, start = {}, 0
    for name, shape in zip(sub.space.names, sub.space.shapes, strict=True):
        size = math.prod(shape)
        out[name], start = torch.arange(start, start + size), start + size
    return out


def _block(objective: Objective, group: Group, M: torch.Tensor) -> DenseBlock:
    shapes = [objective.params[n].shape for n in group.names]
    return DenseBlock(group.names, shapes, (M + M.T) / 2, group.label)
