"""The per-layer table: trace, trace per parameter and top eigenvalue of each diagonal block.

Block traces come from one sweep of shared Hutchinson probes (``hesse.block_traces``); the
top eigenvalue of each block from a short Lanczos run on that block. This is the table that
HAWQ (Dong et al. 2019) and Q-BERT (Shen et al. 2020) rank layers by; a model whose
attention and MLP keep their own parameters gets separate attention and MLP rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from hesse.linalg import block_traces, eigs

KINDS = {
    nn.Linear: "linear",
    nn.Conv1d: "conv",
    nn.Conv2d: "conv",
    nn.Conv3d: "conv",
    nn.Embedding: "embedding",
    nn.LayerNorm: "norm",
    nn.BatchNorm1d: "norm",
    nn.BatchNorm2d: "norm",
    nn.BatchNorm3d: "norm",
    nn.GroupNorm: "norm",
}
"""Short names of common module types; other modules are named by their class."""


@dataclass(frozen=True)
class LayerRow:
    """One diagonal block of the curvature.

    Attributes:
        name: module name (``"(root)"`` for parameters of the model itself).
        kind: ``"conv"``, ``"linear"``, ``"norm"``, ``"embedding"`` or the module's class name.
        n_params: parameters in the block.
        trace: Hutchinson estimate of the block's trace.
        trace_stderr: its standard error.
        trace_per_param: ``trace / n_params``, comparable across blocks of different sizes.
        top_eigenvalue: largest eigenvalue of the block.
        top_residual: its residual bound.
        converged: whether that eigenvalue met the tolerance.
    """

    name: str
    kind: str
    n_params: int
    trace: float
    trace_stderr: float
    trace_per_param: float
    top_eigenvalue: float
    top_residual: float
    converged: bool


def layer_table(
    op,
    model: nn.Module,
    *,
    budget: int,
    seed: int,
    tol: float = 1e-3,
    block_size: int = 32,
    by: str = "module",
    groups: dict | None = None,
) -> tuple[LayerRow, ...]:
    """The table of ``op``'s diagonal blocks, one per module (or transformer sub-layer).

    Modules whose parameters are all empty (zero-size, e.g. ``nn.Linear(4, 0)``) have no
    curvature to measure and get no row; :func:`empty_modules` names them.

    Args:
        op: a curvature operator with a parameter layout (``op.space``).
        model: the model, to name each block's module type.
        budget: probes of the shared block-trace sweep; each block's Lanczos run gets at most
            ``max(10, budget // 4)`` products.
        seed: seed of the probes and start vectors.
        tol: relative residual tolerance of the block eigenvalues (a table needs ~3 digits).
        block_size: probes per data pass of the block-trace sweep.
        by: ``"module"``, or ``"block"`` for the attention and MLP of each transformer layer
            (see :func:`blocks_by`), or ``"param"``.
        groups: User groups ``{name: names, prefixes or globs}`` instead of ``by`` (see
            ``ParamSpace.blocks``).

    Returns:
        One ``LayerRow`` per non-empty module, in parameter order.
    """
    traces = block_traces(op, budget, by=by, groups=groups, seed=seed, block_size=block_size)
    rows = []
    for name, names in _blocks(op.space, by, groups).items():
        block = op.restrict(names)
        top = eigs(block, 1, tol=tol, max_matvecs=_block_budget(budget), seed=seed, progress=False)
        t, n = traces[name], block.shape[0]
        rows.append(
            LayerRow(
                name,
                module_kind(model, name),
                n,
                t.value,
                t.stderr,
                t.value / n,
                float(top.values[0]),
                float(top.residuals[0]),
                top.converged,
            )  # fmt: skip
        )
    return tuple(rows)


def blocks_by(space) -> str:
    """How the layer table groups ``space``: ``"block"`` or ``"module"``.

    ``"block"`` (a row per attention and per MLP, as in Q-BERT's tables) when ``space`` holds
    transformer layers, else ``"module"``.
    """
    layers = any(name.endswith((".attention", ".mlp")) for name in space.blocks(by="block"))
    return "block" if layers else "module"


def layer_table_cost(space, budget: int, by: str = "module", groups: dict | None = None) -> int:
    """Most products :func:`layer_table` can spend on a layout ``space`` (a ``ParamSpace``)."""
    return budget + len(_blocks(space, by, groups)) * _block_budget(budget)


def empty_modules(space, by: str = "module", groups: dict | None = None) -> list[str]:
    """Modules of ``space`` whose parameters are all zero-size (no row in the table)."""
    blocks = space.blocks(by, groups)
    return [name for name in blocks if name not in _blocks(space, by, groups)]


def _blocks(space, by: str, groups: dict | None = None) -> dict[str, list[str]]:
    """Parameter names per module, for modules with at least one entry."""
    size = dict(zip(space.names, space.numels, strict=True))
    blocks = space.blocks(by, groups).items()
    return {name: names for name, names in blocks if sum(size[n] for n in names) > 0}


def _block_budget(budget: int) -> int:
    return max(10, budget // 4)


def module_kind(model: nn.Module, name: str) -> str:
    """Short type name of the module ``name`` of ``model``, or the kind of a transformer block.

    Blocks of :func:`blocks_by` (``"h.0.attention"``, ``"h.0.mlp"``) are ``"attention"`` and
    ``"mlp"``; a user group that is no module is ``"group"``.
    """
    if name.endswith((".attention", ".mlp")):
        return name.rpartition(".")[2]
    if name == "(root)":
        return KINDS.get(type(model), type(model).__name__)
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return "group"
    return KINDS.get(type(module), type(module).__name__)
