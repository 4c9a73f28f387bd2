"""Dense curvature matrices of small objectives, computed directly: references for tests.

Each function forms the full ``(d, d)`` matrix with ``torch.func`` (``jacrev``, ``hessian``),
batch by batch, weighting batches exactly, with attention on the math kernel of
``scaled_dot_product_attention`` (the fused kernels have no second derivative). Memory is
``O(d^2)`` and time ``O(d)`` backward passes per batch, so use them on models with at most a
few thousand parameters.
"""

from __future__ import annotations

import torch
from torch.func import grad, hessian, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

from .objective import Objective


def dense_hessian(obj: Objective) -> torch.Tensor:
    r"""The Hessian :math:`\nabla^2 L(\theta)` of the mean loss, ``(d, d)``."""
    theta = obj.space.join(obj.params)

    def term(i: int, batch) -> tuple[torch.Tensor, float]:
        w = {}

        def loss(t: torch.Tensor) -> torch.Tensor:
            value, w["w"] = obj.batch_loss(obj.space.split(t), batch)
            return value

        # reverse over grad, not torch.func.hessian (forward over jacrev): in torch 2.13 the
        # latter gets the cross terms of LayerNorm weights wrong (9.7% off on a GPT-2 block),
        # and forward mode fails through mse_loss's backward (an immutable ZeroTensor tangent)
        H = jacrev(grad(loss))(theta)
        return H, w["w"]

    return _math_attention(obj, term)


def dense_ggn(obj: Objective) -> torch.Tensor:
    r"""The generalized Gauss-Newton matrix :math:`\frac1W\sum_b J_b^\top H_b J_b`, ``(d, d)``."""

    def term(i: int, batch) -> tuple[torch.Tensor, float]:
        J, f, y, w = _jacobian(obj, batch)
        Hf = hessian(lambda out: obj.output_loss(out.reshape(f.shape), y, w))(f.reshape(-1))
        return J.T @ Hf @ J, w

    return _math_attention(obj, term)


def dense_fisher(obj: Objective) -> torch.Tensor:
    r"""The empirical Fisher :math:`\frac1W\sum_n g_n g_n^\top` of the loss's terms, ``(d, d)``.

    The terms are the rows (dim 0) of ``Objective.outputs``: samples, or tokens for a loss
    inferred for a Hugging Face token model; :math:`g_n` is the gradient of term :math:`n` of
    the weighted batch loss (zero for an ignored label).
    """

    def term(i: int, batch) -> tuple[torch.Tensor, float]:
        J, f, y, w = _jacobian(obj, batch)
        r = torch.func.grad(lambda out: obj.output_loss(out, y, w))(f)
        n = f.shape[0]
        G = torch.einsum("nq,nqd->nd", r.reshape(n, -1), J.reshape(n, -1, J.shape[-1]))
        return G.T @ G, w

    return _math_attention(obj, term)


def _math_attention(obj: Objective, term) -> torch.Tensor:
    """``obj.accumulate(term)`` with attention on SDPA's math kernel."""
    with sdpa_kernel(SDPBackend.MATH):
        return obj.accumulate(term)


def _jacobian(obj: Objective, batch):
    """Jacobian ``(m, d)`` of the flattened outputs, the outputs, targets and batch weight."""
    theta = obj.space.join(obj.params)
    f = obj.outputs(obj.params, batch).detach()
    J = jacrev(lambda t: obj.outputs(obj.space.split(t), batch).reshape(-1))(theta)
    return J, f, obj.targets(batch), obj.batch_weight(batch)
