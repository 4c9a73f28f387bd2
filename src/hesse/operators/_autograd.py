"""Differentiating a model twice: kept linearizations, backward passes per column, clear errors."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..problem.objective import Batch, Objective

Tangents = dict[str, torch.Tensor]

_NO_SECOND_DERIVATIVE = (
    re.compile(r"derivative for '?([\w.:]+?)'? is not implemented"),
    re.compile(r"differentiate twice a function that was marked with @once_differentiable"),
)
_ONCE = "a torch.autograd.Function marked @once_differentiable"


@contextmanager
def second_order(name: str) -> Iterator[None]:
    """Differentiate the model twice: SDPA's math kernel, and a clear error for other ops.

    The fused kernels of ``scaled_dot_product_attention`` (flash, memory-efficient, the CPU
    flash kernel that Hugging Face models use by default) have neither a double backward nor
    a forward-mode derivative; the math kernel computes the same function from ops that do.
    """
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    except RuntimeError as err:
        op = _op_without_second_derivative(str(err))
        if op is None:
            raise
        raise _not_twice_differentiable(name, op) from err


def check_twice_differentiable(name: str, grads: Iterable[torch.Tensor]) -> None:
    """Refuse a backward graph that holds a once-differentiable Function's ``Error`` node.

    Such a Function's backward output is detached from the saved tensors it was computed
    from, so a second backward that does not pass through the ``Error`` node silently misses
    those terms (a Hessian of zeros, not an error).
    """
    seen, stack = set(), [t.grad_fn for t in grads if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "Error":
            raise _not_twice_differentiable(name, _ONCE)
        stack.extend(n for n, _ in node.next_functions if n is not None)


def _not_twice_differentiable(name: str, op: str) -> RuntimeError:
    return RuntimeError(
        f"{name}: the model calls {op}, which PyTorch cannot differentiate twice (no double "
        "backward), but a curvature product differentiates the model's backward pass "
        "(Hessian, and the Jacobian products of GGN and Fisher). Use an implementation of that "
        "module with a double backward (e.g. attn_implementation='eager' or 'sdpa' for a "
        "Hugging Face model), or analyse only parameters that no input of that op depends on "
        "(params=)."
    )


def _op_without_second_derivative(message: str) -> str | None:
    for pattern in _NO_SECOND_DERIVATIVE:
        found = pattern.search(message)
        if found:
            return found.group(1) if pattern.groups else _ONCE
    return None


def leaf_params(objective: Objective) -> Tangents:
    """The parameters as fresh leaves that require gradients (a graph of their own)."""
    return {n: p.detach().requires_grad_(True) for n, p in objective.params.items()}


class Linearization:
    r"""The model's outputs on one batch as a linear function of the parameters.

    Keeps the forward graph of :math:`f(\theta)` and the graph of :math:`J^\top u` for a
    dummy :math:`u`, so that both :math:`J^\top z` (one backward) and :math:`J v` (the backward
    of :math:`J^\top u` with respect to :math:`u`, which is linear in :math:`u`) run through
    kept graphs without touching the model again.
    """

    def __init__(self, objective: Objective, batch: Batch):
        params = leaf_params(objective)
        with torch.enable_grad():
            f = objective.outputs(params, batch)
            u = torch.zeros_like(f, requires_grad=True)
            # outputs that do not reach the analysed parameters (a restricted block the batch
            # routes around) have J = 0
            JTu = (
                torch.autograd.grad(
                    f, list(params.values()), u, create_graph=True, allow_unused=True
                )
                if f.requires_grad
                else (None,) * len(params)
            )
        self.params, self.f, self.u = params, f, u
        self.JTu = {n: t for n, t in zip(params, JTu, strict=True) if t is not None}

    def jvp(self, V: Tangents) -> torch.Tensor:
        """:math:`J v` for each column: ``(k, *f.shape)``."""
        k = next(iter(V.values())).shape[0]
        if not self.JTu:
            return self.f.new_zeros((k, *self.f.shape))
        (JV,) = backward_columns(
            list(self.JTu.values()), {"u": self.u}, [V[n] for n in self.JTu]
        ).values()
        return JV

    def vjp(self, Z: torch.Tensor) -> Tangents:
        r""":math:`J^\top z` for each row of ``Z`` ``(k, *f.shape)``."""
        if not self.f.requires_grad:
            return {n: p.new_zeros((Z.shape[0], *p.shape)) for n, p in self.params.items()}
        return backward_columns([self.f], self.params, [Z])


def backward_columns(
    outputs: list[torch.Tensor],
    inputs: Tangents,
    grads: list[torch.Tensor],
    out: Tangents | None = None,
) -> Tangents:
    """``k`` backward passes through a kept graph, one per column of ``grads`` ``(k, ...)``.

    One backward per column: measured on CPU, vectorizing the columns with
    ``is_grads_batched`` was 1.2-1.5x slower per column than this loop. Each column's
    gradients are copied into ``out`` (``(k, *shape)`` per input, e.g. views of a caller's
    buffer; default: new zeros) as soon as they come out, so that one column's gradients are
    alive at a time, not ``k`` of them and then a stacked copy.
    """
    xs, k = list(inputs.values()), grads[0].shape[0]
    if out is None:
        out = {n: x.new_zeros((k, *x.shape)) for n, x in inputs.items()}
    for j in range(k):
        col = torch.autograd.grad(
            outputs,
            xs,
            [g[j] for g in grads],
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        for n, c in zip(inputs, col, strict=True):
            out[n][j].copy_(c)
        del col
    return out
