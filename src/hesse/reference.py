"""Dense curvature matrices of small objectives, computed directly: references for tests.

Each function forms the full ``(d, d)`` matrix with ``torch.func`` (``hessian``, ``jacrev``),
batch by batch, weighting batches exactly; memory is ``O(d^2)`` and time ``O(d)`` backward
passes per batch, so use them on models with at most a few thousand parameters.
"""

from __future__ import annotations

import torch
from torch.func import hessian, jacrev

from .objective import Objective


def dense_hessian(obj: Objective) -> torch.Tensor:
    r"""The Hessian :math:`\nabla^2 L(\theta)` of the mean loss, ``(d, d)``."""
    theta = obj.space.join(obj.params)

    def term(i: int, batch) -> tuple[torch.Tensor, float]:
        w = {}

        def loss(t: torch.Tensor) -> torch.Tensor:
            value, w["w"] = obj.batch_loss(obj.space.split(t), batch)
            return value

        H = hessian(loss)(theta)
        return H, w["w"]

    return obj.accumulate(term)


def dense_ggn(obj: Objective) -> torch.Tensor:
    r"""The generalized Gauss-Newton matrix :math:`\frac1W\sum_b J_b^\top H_b J_b`, ``(d, d)``."""

    def term(i: int, batch) -> tuple[torch.Tensor, float]:
        J, f, y, w = _jacobian(obj, batch)
        Hf = hessian(lambda out: obj.output_loss(out.reshape(f.shape), y, w))(f.reshape(-1))
        return J.T @ Hf @ J, w

    return obj.accumulate(term)


def dense_fisher(obj: Objective) -> torch.Tensor:
    r"""The empirical Fisher :math:`\frac1W\sum_n g_n g_n^\top` of per-sample gradients, ``(d, d)``.

    Samples lie along dim 0 of the model outputs; :math:`g_n` is the gradient of sample
    :math:`n`'s term of the weighted batch loss.
    """

    def term(i: int, batch) -> tuple[torch.Tensor, float]:
        J, f, y, w = _jacobian(obj, batch)
        r = torch.func.grad(lambda out: obj.output_loss(out, y, w))(f)
        n = f.shape[0]
        G = torch.einsum("nq,nqd->nd", r.reshape(n, -1), J.reshape(n, -1, J.shape[-1]))
        return G.T @ G, w

    return obj.accumulate(term)


def _jacobian(obj: Objective, batch):
    """Jacobian ``(m, d)`` of the flattened outputs, the outputs, targets and batch weight."""
    theta = obj.space.join(obj.params)
    f = obj.outputs(obj.params, batch).detach()
    J = jacrev(lambda t: obj.outputs(obj.space.split(t), batch).reshape(-1))(theta)
    return J, f, obj.targets(batch), obj.batch_weight(batch)
