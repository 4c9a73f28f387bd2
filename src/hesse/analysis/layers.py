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
    op, model: nn.Module, *, budget: int, seed: int, tol: float = 1e-3
) -> tuple[LayerRow, ...]:
    """The table of ``op``'s diagonal blocks, one per module.

    Args:
        op: a curvature operator with a parameter layout (``op.space``).
        model: the model, to name each block's module type.
        budget: probes of the shared block-trace sweep; each block's Lanczos run gets at most
            ``max(10, budget // 4)`` products.
        seed: seed of the probes and start vectors.
        tol: relative residual tolerance of the block eigenvalues (a table needs ~3 digits).

    Returns:
        One ``LayerRow`` per module, in parameter order.
    """
    traces = block_traces(op, budget, by="module", seed=seed)
    rows = []
    for name, block in op.blocks(by="module").items():
        top = eigs(block, 1, tol=tol, max_matvecs=max(10, budget // 4), seed=seed)
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


def module_kind(model: nn.Module, name: str) -> str:
    """Short type name of the module ``name`` of ``model``."""
    module = model if name == "(root)" else model.get_submodule(name)
    return KINDS.get(type(module), type(module).__name__)
