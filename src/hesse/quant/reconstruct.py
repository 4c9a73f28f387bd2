"""Block-wise post-training reconstruction weighted by the average perturbation Hessian (APHQ)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from ..objective import Objective
from ._layers import quantizable, unknown
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
    calibration loss never ends above round-to-nearest's).
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
        blocks: Module names reconstructed one at a time, in forward order (default: the
            top-level modules holding quantized layers, ``ModuleList`` entries one by one).
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
    order = _blocks(obj.model, layers, blocks)
    modules = dict(obj.model.named_modules())
    state = obj.frozen | obj.params
    full = dict(state)
    batches = list(obj.batches())
    for block in order:
        owned = {n: p for n, p in layers.items() if p.startswith(block + ".")}
        target, h = _targets(obj, full, modules[block], batches, weighting, eps)
        inputs = _inputs(obj, state, modules[block], batches)
        grids = {n: quantizer.codes(state[p], bits[n], name=n) for n, p in owned.items()}
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


def _default_blocks(model: nn.Module, prefix: str = "") -> list[str]:
    out = []
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        out += _default_blocks(child, full + ".") if isinstance(child, _CONTAINERS) else [full]
    return out


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
    return _hooked(obj, state, module, batches, lambda a, k, o: tree_map(_detach, (a, k)))


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
    return out[0] if isinstance(out, tuple) else out


def _detach(x):
    return x.detach() if isinstance(x, torch.Tensor) else x
