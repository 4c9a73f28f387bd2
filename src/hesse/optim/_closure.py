"""Calling a closure and differentiating what it returns, with the errors users need."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

HINT = (
    "Write it as `def closure(): return loss_fn(model(x), y)`; the optimizer differentiates the "
    "loss itself"
)


def call(closure: Callable | None, who: str, *, logits: bool = False):
    """Run ``closure`` under ``enable_grad`` and return ``(loss, logits or None)``.

    Raises:
        ValueError: no closure, or the closure returned no scalar loss (or no logits when they
            are needed).
    """
    if closure is None:
        raise ValueError(f"{who}.step needs a closure that recomputes the loss. {HINT}.")
    with torch.enable_grad():
        out = closure()
    if logits:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError(
                f"{who}: the closure must return (loss, logits) (the Gauss-Newton-Bartlett "
                f"estimator samples labels from the logits); it returned {_what(out)}. Return "
                "`loss, logits` with logits of shape (..., classes) for the rows that count."
            )
        out, rows = out
        _check_logits(rows, who)
    else:
        rows = None
    _check_loss(out, who)
    return out, rows


def gradients(
    loss: torch.Tensor,
    params: Sequence[torch.Tensor],
    who: str,
    *,
    create_graph: bool = False,
    retain_graph: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """``d loss / d params``; None for parameters the loss does not reach.

    None, not zeros, as in ``torch.optim``: a parameter without a gradient is skipped by the
    optimizers (no update, no state), so that momentum and weight decay do not move it.

    ``create_graph`` keeps the gradient differentiable (for Hessian-vector products);
    ``retain_graph`` keeps the graph for one more backward (e.g. through the logits).

    Raises:
        ValueError: the closure already called ``backward`` (the graph is gone).
    """
    try:
        g = torch.autograd.grad(
            loss,
            params,
            create_graph=create_graph,
            retain_graph=retain_graph or create_graph,
            allow_unused=True,
        )
    except RuntimeError as err:
        if "second time" not in str(err):
            raise
        raise ValueError(
            f"{who}: the closure called backward(), which freed the graph. Return the loss "
            f"without calling backward(). {HINT}."
        ) from err
    return g


def _check_loss(loss, who: str) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(
            f"{who}: the closure must return the loss as a scalar tensor; it returned "
            f"{_what(loss)}. {HINT}."
        )
    if not loss.requires_grad:
        raise ValueError(
            f"{who}: the loss the closure returned does not depend on the parameters "
            "(requires_grad is False); compute it with gradients enabled, without .item() or "
            ".detach()."
        )


def _check_logits(logits, who: str) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2 or not logits.requires_grad:
        raise ValueError(
            f"{who}: the closure returned {_what(logits)} as logits; expected a tensor of shape "
            "(..., classes) that depends on the parameters."
        )


def _what(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def first_order(closure: Callable | None, params: Sequence[torch.Tensor], who: str):
    """Gradients of the closure's loss at the current parameters: ``(loss, grads)``.

    ``grads`` holds None for the parameters that the loss does not reach.

    A first-order optimizer accepts both kinds of closure: one that returns the loss (it is
    differentiated here), and one that calls ``backward()`` itself, possibly once per
    micro-batch for gradient accumulation (its accumulated ``.grad`` are used).
    """
    for p in params:
        p.grad = None
    if closure is None:
        raise ValueError(f"{who}.step needs a closure that recomputes the loss. {HINT}.")
    with torch.enable_grad():
        loss = closure()
    if any(p.grad is not None for p in params):
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"{who}: the closure must return the loss; it returned {_what(loss)}.")
        return loss, [p.grad for p in params]
    _check_loss(loss, who)
    return loss, list(gradients(loss, params, who))
