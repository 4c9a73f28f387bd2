"""One pruning pipeline: saliency, masks, OBS updates, gradual steps, and the pruned copy."""

from __future__ import annotations

from ..problem.objective import Objective
from ._patterns import check_sparsity
from ._result import PrunePlan
from ._sequential import sparsegpt_plan
from ._structured_plan import GROUP_METHODS, prune_units
from ._units import STRUCTURES
from ._unstructured_plan import WEIGHT_METHODS, Settings, prune_weights

__all__ = ["GROUP_METHODS", "WEIGHT_METHODS", "PrunePlan", "prune"]


def prune(
    obj: Objective,
    sparsity: float | None = None,
    method: str | None = None,
    *,
    structure: str = "unstructured",
    scope: str | None = None,
    recompute: int = 1,
    params=None,
    curvature: str = "fisher",
    damping: float = 1e-2,
    m: int | str | None = "auto",
    batch_size: int = 1,
    budget: int | None = None,
    block: int = 128,
    fisher_block: int | None = 128,
    seed: int = 0,
    sequential: bool = True,
) -> PrunePlan:
    """Decide which weights (or heads, or MLP neurons) to remove, and how to move the others.

    Each of ``recompute`` steps raises the sparsity linearly to its target, evaluates the
    saliencies (and curvature) at the current, already pruned weights, removes the least
    salient of the weights still there, and, for ``"obs"``/``"mfac"``/``"layer_obs"``, moves
    the remaining weights by the OBS update. The default curvature is the empirical Fisher
    (positive semi-definite) with damping relative to its mean diagonal: the exact Hessian of a
    trained network is indefinite, and OBS with its inverse can raise the loss a hundredfold.

    Args:
        obj: The objective (model, data, loss).
        sparsity: Fraction in ``[0, 1)``: of the pruned weights (unstructured), or of the heads
            or neurons (structured); None means 0.5, or the pattern's own for ``n:m``.
        method: Unstructured and ``n:m``: ``"magnitude"``, ``"obd"``, ``"obs"`` (dense),
            ``"mfac"`` (Woodbury, the default), ``"layer_obs"`` (the OBC/SparseGPT sweep per
            layer, see :func:`obs_layer`, all input Hessians from one pass at each step) or
            ``"sparsegpt"`` (SparseGPT: the same sweep block by block, each transformer
            block's inputs through the blocks already pruned; one step). Heads/channels:
            ``"nvit"`` (default), ``"heapr"`` (channels only), ``"magnitude"`` or ``"random"``.
        structure: ``"unstructured"``, ``"n:m"`` (e.g. ``"2:4"``), ``"heads"`` or
            ``"channels"`` (MLP intermediate neurons).
        scope: ``"global"`` (default; one ranking over all layers) or ``"layer"`` (the same
            sparsity in each tensor or module; the only scope of ``"layer_obs"``).
        recompute: Steps of gradual pruning (1: one shot).
        params: Parameters to prune (names or patterns); default: the weights of at least two
            dimensions outside embeddings.
        curvature: ``"fisher"``, ``"ggn"`` or ``"hessian"`` (OBD and OBS), or ``"kfac"`` /
            ``"ekfac"`` (OBD and OBS with the Kronecker-factored GGN, as LLM Surgeon: any size,
            exact for K + λI block by block; the weights pruned in earlier steps are held at
            zero by each OBS update rather than decoupled).
        damping: Damping relative to the mean curvature diagonal (and to the mean diagonal of
            each layer's input Hessian for ``"layer_obs"``); raised where a Cholesky fails.
        m: Gradients of the empirical Fisher per step (``"auto"``: 256, or every chunk when
            the data holds fewer; None: every chunk).
        batch_size: Samples per gradient.
        budget: Hutchinson probes of an OBD GGN/Hessian diagonal (None: exact).
        block: Columns per block of ``"layer_obs"``.
        fisher_block: Weights per diagonal block of the ``"mfac"`` Fisher (None: one global
            Woodbury); blocks of 128 measured better than one block on tiny-lm.
        seed: Seed of the gradients drawn, probes, and ``"random"``.
        sequential: ``"sparsegpt"`` only: calibrate each block on the outputs of the blocks
            already pruned, holding one block's inputs and Hessians at a time (False: one
            pass of the dense model, every Hessian at once).

    Returns:
        The :class:`PrunePlan`; ``plan.apply(model)`` gives the pruned copy.

    Raises:
        ValueError: a sparsity outside ``[0, 1)``, an unknown method, structure or scope, an
            ``n:m`` pattern that does not divide a selected weight's rows, ``m`` larger than
            the data, or ``recompute < 1``.
    """
    if not (isinstance(recompute, int) and recompute >= 1):
        raise ValueError(f"prune: recompute must be an integer >= 1, got {recompute!r}.")
    if structure in STRUCTURES:
        sparsity = 0.5 if sparsity is None else sparsity
        check_sparsity(sparsity, "prune")
        return prune_units(
            obj,
            sparsity,
            method or "nvit",
            structure,
            scope or "global",
            recompute,
            m,
            batch_size,
            seed,
        )
    if method == "sparsegpt":
        if recompute != 1 or scope not in (None, "layer"):
            raise ValueError(
                "prune: method 'sparsegpt' is one-shot and prunes each layer alike; pass "
                f"recompute=1 and scope='layer' or None, got {recompute!r} and {scope!r}."
            )
        return sparsegpt_plan(
            obj, sparsity, structure, params, block=block, damping=damping, sequential=sequential
        )
    settings = Settings(
        method or "mfac", curvature, damping, m, batch_size, budget, block, fisher_block, seed
    )
    return prune_weights(obj, sparsity, structure, scope, recompute, params, settings)
