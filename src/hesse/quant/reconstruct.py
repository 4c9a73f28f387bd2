"""Block-wise post-training reconstruction weighted by the average perturbation Hessian (APHQ)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from ..problem._blocks import module_prefixes, transformer_blocks
from ..problem.objective import Objective
from ._layers import output_axes, quantizable, tied, unknown
from .quantizer import Codes, Quantizer, check_bits

WEIGHTINGS = ("aphq", "mse")
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def reconstruct(
    obj: Objective,
    bits: Mapping[str, int],
    *,
    quantizer: Quantizer | None = None,
    weighting: str = "aphq",
    blocks: Sequence[str] | None = None,
    steps: int = 100,
    lr: float = 1e-3,
    eps: float = 1e-2,
    seed: int = 0,
) -> nn.Module:
    r"""A quantized copy of ``obj.model`` whose weights are fitted block by block to its outputs.

    Blocks are taken in order. For block :math:`k` with full-precision output :math:`Y`
    (on full-precision inputs) and input :math:`\hat X` from the model whose earlier blocks
    are already quantized, the block's quantized weights minimise

    .. math:: \frac{1}{N} \sum h \odot \big(f_k(\hat X; Q(V)) - Y\big)^2

    over :math:`V` (started at the weights; :math:`Q` rounds to the grid of the original
    weights, with a straight-through gradient), by Adam on all of ``obj``'s batches per step,
    keeping the best rounded weights seen (round-to-nearest is the first, so the block's
    calibration loss never ends above round-to-nearest's). A weight used in several blocks
    (tied to an embedding) is rounded to nearest before the first block and not fitted, so
    every block is fitted on the inputs the quantized model gives it.
    ``weighting="aphq"``: :math:`h` is the average perturbation Hessian of APHQ-ViT (Wu et
    al. 2025, "APHQ-ViT: post-training quantization with average perturbation Hessian based
    reconstruction for vision transformers"): with :math:`g(\cdot)` the gradient of the loss
    with respect to the block's output,

    .. math:: h = \frac{|g(Y + \epsilon) - g(Y - \epsilon)|}{2\epsilon}
        \approx |H_Y \mathbf 1|,

    the absolute Hessian row sums, as the paper's code computes them, normalised to mean 1.
    ``weighting="mse"``: :math:`h = 1` (plain output reconstruction).

    Args:
        obj: The loss, model and calibration data; the quantized weights must be among its
            parameters.
        bits: ``{layer: bits}`` (e.g. ``Allocation.bits``).
        quantizer: The grid (default ``Quantizer()``).
        weighting: ``"aphq"`` or ``"mse"``.
        blocks: Module names reconstructed one at a time, in forward order (default: each
            transformer layer, attention and MLP together, and each module outside the layers
            that holds quantized layers, as :func:`hesse.problem._blocks.transformer_blocks` finds
            them; in a model without transformer layers, the top-level modules, ``ModuleList``
            entries one by one).
        steps: Adam steps per block.
        lr: Adam's learning rate, relative to each layer's mean step size :math:`s`.
        eps: The perturbation :math:`\epsilon`, relative to the output's standard deviation.
        seed: Unused by the computation (deterministic); kept for the common signature.

    Returns:
        The quantized copy (its weights are on the grids that ``quantize`` uses).

    Raises:
        ValueError: unknown weighting, layer or block, a layer outside every block, or
            weights that ``obj`` does not analyse.
    """
    del seed
    if weighting not in WEIGHTINGS:
        raise ValueError(f"reconstruct: weighting must be one of {WEIGHTINGS}, got {weighting!r}.")
    quantizer = quantizer or Quantizer()
    layers = _layers(obj, bits)
    axes = output_axes(obj.model, layers)
    shared = tied(obj.model, layers)
    order = _blocks(obj.model, {n: p for n, p in layers.items() if n not in shared}, blocks)
    modules = dict(obj.model.named_modules())
    state = obj.frozen | obj.params
    full = dict(state)
    for n in shared:  # used in several blocks: rounded to nearest before the first, then fixed
        p = layers[n]
        codes = quantizer.codes(state[p], bits[n], name=n, axis=axes[n])
        state = state | {p: codes.dequantize().to(state[p].dtype)}
    batches = list(obj.batches())
    for block in order:
        owned = {n: p for n, p in layers.items() if n not in shared and p.startswith(block + ".")}
        target, h = _targets(obj, full, modules[block], batches, weighting, eps)
        inputs = _inputs(obj, state, modules[block], batches)
        grids = {
            n: quantizer.codes(state[p], bits[n], name=n, axis=axes[n]) for n, p in owned.items()
        }
        fitted = _fit(modules[block], block, state, owned, grids, (inputs, target, h), steps, lr)
        state = state | fitted
    out = copy.deepcopy(obj.model)
    weights = dict(out.named_parameters())
    with torch.no_grad():
        for p in layers.values():
            weights[p].copy_(state[p])
    return out


def _layers(obj: Objective, bits: Mapping[str, int]) -> dict[str, str]:
    found = quantizable(obj.model)
    for name, b in bits.items():
        if name not in found:
            raise ValueError(unknown(name, found))
        check_bits(b, f"reconstruct({name!r})")
        if found[name] not in obj.params:
            raise ValueError(
                f"reconstruct: the objective does not analyse {found[name]!r}; build it with "
                "params= that include every quantized weight (or leave params= out)."
            )
    return {n: found[n] for n in bits}


def _blocks(model: nn.Module, layers: dict[str, str], blocks: Sequence[str] | None) -> list[str]:
    modules = dict(model.named_modules())
    if blocks is None:
        blocks = _default_blocks(model)
    for b in blocks:
        if b not in modules:
            raise ValueError(f"reconstruct: no module {b!r} in the model to use as a block.")
    chosen = [b for b in blocks if any(p.startswith(b + ".") for p in layers.values())]
    stray = [n for n, p in layers.items() if not any(p.startswith(b + ".") for b in chosen)]
    if stray:
        raise ValueError(
            f"reconstruct: layers {stray} are in no block of {list(blocks)}; pass blocks= that "
            "cover every quantized layer (module names, in forward order)."
        )
    return chosen


def _default_blocks(model: nn.Module) -> list[str]:
    """Whole transformer layers and the modules outside them, in registration order.

    The blocks of :func:`hesse.problem._blocks.transformer_blocks`, each taken as the
    innermost module holding all its parameters (a layer's attention and MLP share the
    layer's module), with blocks inside another block dropped and ``ModuleList`` /
    ``ModuleDict`` entries one by one.
    """
    modules = dict(model.named_modules())
    found: list[str] = []
    for params in transformer_blocks([n for n, _ in model.named_parameters()]).values():
        common = set.intersection(*(set(module_prefixes(p)) for p in params))
        if common:
            found += _callable(modules, max(common, key=len))
    return [b for b in dict.fromkeys(found) if not any(b.startswith(o + ".") for o in found)]


def _callable(modules: dict[str, nn.Module], name: str) -> list[str]:
    """``name``, or the entries of a container (which has no forward of its own)."""
    if not isinstance(modules[name], _CONTAINERS):
        return [name]
    children = [n for n in modules if n.startswith(name + ".") and "." not in n[len(name) + 1 :]]
    return [b for child in children for b in _callable(modules, child)]


def _hooked(obj: Objective, params: dict, module: nn.Module, batches: list, hook: Callable) -> list:
    """Run every batch's loss at ``params`` with ``hook`` on ``module``; collect its returns."""
    found: list = []

    def record(mod, args, kwargs, out):
        found.append(hook(args, kwargs, out))

    handle = module.register_forward_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                obj.batch_loss(_analysed(obj, params), batch)
    finally:
        handle.remove()
    return found


def _inputs(obj: Objective, state: dict, module: nn.Module, batches: list) -> list:
    return _hooked(obj, state, module, batches, lambda a, k, o: tree_map(_replayable, (a, k)))


def _targets(obj, state, module, batches, weighting, eps):
    """Full-precision outputs of the block and, for APHQ, the weights ``h`` (mean 1)."""
    Y = _hooked(obj, state, module, batches, lambda a, k, o: _first(o).detach())
    if weighting == "mse":
        return Y, [torch.ones_like(y) for y in Y]
    h = []
    for batch, y in zip(batches, Y, strict=True):
        step = eps * float(y.std())
        plus, minus = (_output_gradient(obj, state, module, batch, s) for s in (step, -step))
        h.append((plus - minus).abs() / (2 * step))
    mean = torch.cat([t.reshape(-1) for t in h]).mean()
    return Y, [t / mean if mean > 0 else torch.ones_like(t) for t in h]


def _output_gradient(obj, state, module, batch, shift: float) -> torch.Tensor:
    """Gradient of the batch's loss with respect to the block output shifted by ``shift``."""
    held: list[torch.Tensor] = []

    def shifted(mod, args, out):
        z = (_first(out).detach() + shift).requires_grad_(True)
        held.append(z)
        return (z, *out[1:]) if isinstance(out, tuple) else z

    handle = module.register_forward_hook(shifted)
    try:
        with torch.enable_grad():
            loss, _ = obj.batch_loss(_analysed(obj, state), batch)
            return torch.autograd.grad(loss, held[0])[0]
    finally:
        handle.remove()


def _fit(module, block, state, owned, grids, data, steps, lr) -> dict:
    """Adam on the block's weights ``V`` with the straight-through rounding ``Q(V)``.

    Every step's loss is the loss of the rounded weights on all calibration batches, so the
    best rounded weights seen are kept; the first step is round-to-nearest, which the result
    therefore never does worse than on the calibration data.
    """
    inputs, target, h = data
    local = {k: v for k, v in state.items() if k.startswith(block + ".")}
    V = {n: state[p].detach().clone().requires_grad_(True) for n, p in owned.items()}
    step = {n: float(grids[n].scale.mean()) for n in owned}
    optimizer = torch.optim.Adam([{"params": [V[n]], "lr": lr * step[n]} for n in owned])
    best, kept = float("inf"), {}
    for _ in range(steps + 1):
        weights = {p: _straight_through(V[n], grids[n]) for n, p in owned.items()}
        params = {name[len(block) + 1 :]: t for name, t in (local | weights).items()}
        loss = sum(
            (hk * (_first(functional_call(module, params, args, kwargs)) - yk) ** 2).mean()
            for (args, kwargs), yk, hk in zip(inputs, target, h, strict=True)
        ) / len(inputs)
        if loss.item() < best:
            best, kept = loss.item(), {p: w.detach() for p, w in weights.items()}
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return kept


def _straight_through(V: torch.Tensor, grid: Codes) -> torch.Tensor:
    return V + (grid.project(V) - V).detach()


def _analysed(obj: Objective, state: dict) -> dict:
    return {n: state[n] for n in obj.params}


def _first(out):
    y = out[0] if isinstance(out, tuple) else out
    if not isinstance(y, torch.Tensor):
        raise ValueError(
            f"reconstruct: a block returned {type(y).__name__}, not a tensor or a tuple that "
            "starts with one; pass blocks= naming modules that return their output tensor."
        )
    return y


def _replayable(x):
    """An input of a block as it can be passed again: detached, and without a KV cache.

    A Hugging Face cache (GPT-2's blocks take one) grows on every call: replayed, the block
    would attend to keys it has already cached.
    """
    if isinstance(x, torch.Tensor):
        return x.detach()
    return None if type(x).__module__.startswith("transformers.cache_utils") else x
