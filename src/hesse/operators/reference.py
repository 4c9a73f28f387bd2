"""Dense curvature matrices of small objectives, computed directly: references for tests.

Each function forms the full ``(d, d)`` matrix with ``torch.func`` (``jacrev``, ``grad``),
batch by batch, weighting batches exactly, with attention on the math kernel of
``scaled_dot_product_attention`` (the fused kernels have no second derivative). Memory is
``O(d^2)`` and time ``O(d)`` backward passes per batch, so use them on models with at most a
few thousand parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.func import grad, hessian, jacrev

from ..problem.objective import Batch, Objective
from ._autograd import second_order


def _unsharded(obj: Objective, who: str) -> None:
    if obj.shard is not None:
        raise ValueError(
            f"{who}: the objective's parameters are sharded across processes (FSDP); the dense "
            "references are of one process's full model: build the Objective on the unsharded "
            "model, or use Operator.to_dense() (this process's rows of the full matrix)."
        )


def dense_hessian(obj: Objective) -> torch.Tensor:
    r"""The Hessian of the mean loss, formed column by column.

    .. math::
        \nabla^2 L(\theta) = \frac{1}{W} \sum_b \nabla^2 \big(w_b\, \ell_b(\theta)\big),
        \qquad W = \sum_b w_b

    Args:
        obj: The objective (any loss, ``loss_fn=`` included).

    Returns:
        ``(d, d)`` tensor of ``obj.dtype``, in the layout of ``obj.space``.

    Example:
        Linear least squares, :math:`L(w) = \frac1n \|Xw - t\|^2`, has the Hessian
        :math:`2 X^\top X / n` at every :math:`w`:

        >>> _ = torch.manual_seed(0)
        >>> X, t = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> model = torch.nn.Linear(3, 1, bias=False).double().eval()
        >>> obj = Objective(model, [(X[:5], t[:5]), (X[5:], t[5:])], loss=torch.nn.MSELoss())
        >>> torch.allclose(dense_hessian(obj), 2 * X.T @ X / 8, rtol=1e-12, atol=0)
        True
    """
    _unsharded(obj, "dense_hessian")
    theta = obj.space.join(obj.params)

    def term(i: int, batch: Batch) -> tuple[torch.Tensor, float]:
        def loss(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            value, w = obj.batch_loss(obj.space.split(t), batch)
            return value, torch.tensor(float(w), dtype=torch.float64)  # aux must be a tensor

        # reverse over grad, not torch.func.hessian (forward over jacrev): in torch 2.13 the
        # latter gets the cross terms of LayerNorm weights wrong (9.7% off on a GPT-2 block),
        # and forward mode fails through mse_loss's backward (an immutable ZeroTensor tangent)
        H, w = jacrev(grad(loss, has_aux=True), has_aux=True)(theta)
        return H, float(w)

    return _math_attention(obj, term)


def dense_ggn(obj: Objective) -> torch.Tensor:
    r"""The generalized Gauss-Newton matrix of a loss of the model outputs.

    .. math::
        G = \frac{1}{W} \sum_b J_b^\top \big(\nabla_f^2\, w_b \ell_b\big) J_b

    with :math:`J_b` the Jacobian of batch :math:`b`'s outputs :math:`f` (``obj.outputs``)
    with respect to :math:`\theta` (Schraudolph 2002, "Fast curvature matrix-vector products
    for second-order gradient descent").

    Args:
        obj: An objective built with ``loss=``, or with a loss inferred for a Hugging Face model.

    Returns:
        ``(d, d)`` tensor of ``obj.dtype``.
    """

    def term(i: int, batch: Batch) -> tuple[torch.Tensor, float]:
        J, f, y, w = _jacobian(obj, batch)
        Hf = hessian(lambda out: obj.output_loss(out.reshape(f.shape), y, w))(f.reshape(-1))
        return J.T @ Hf @ J, w

    return _math_attention(obj, term)


def dense_fisher(obj: Objective) -> torch.Tensor:
    r"""The empirical Fisher of the loss's terms.

    .. math::
        F = \frac{1}{W} \sum_n g_n g_n^\top

    The terms are the rows (dim 0) of ``Objective.outputs``: samples, or tokens for a loss
    inferred for a Hugging Face token model; :math:`g_n` is the gradient of term :math:`n` of
    the weighted batch loss (zero for an ignored label).

    Args:
        obj: An objective built with ``loss=``, or with a loss inferred for a Hugging Face model.

    Returns:
        ``(d, d)`` tensor of ``obj.dtype``.
    """

    def term(i: int, batch: Batch) -> tuple[torch.Tensor, float]:
        J, f, y, w = _jacobian(obj, batch)
        r = grad(lambda out: obj.output_loss(out, y, w))(f)
        n = f.shape[0]
        G = torch.einsum("nq,nqd->nd", r.reshape(n, -1), J.reshape(n, -1, J.shape[-1]))
        return G.T @ G, w

    return _math_attention(obj, term)


def _math_attention(obj: Objective, term: Callable[[int, Any], tuple]) -> torch.Tensor:
    """``obj.accumulate(term)`` as the operators differentiate twice (SDPA's math kernel)."""
    with second_order("hesse.reference"):
        return obj.accumulate(term)


def _jacobian(
    obj: Objective, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Jacobian ``(m, d)`` of the flattened outputs, the outputs, targets and batch weight."""
    _unsharded(obj, "hesse.reference")

    def outputs(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = obj.outputs(obj.space.split(t), batch)
        return f.reshape(-1), f  # the outputs themselves as aux: one forward pass

    J, f = jacrev(outputs, has_aux=True)(obj.space.join(obj.params))
    return J, f, obj.targets(batch), obj.batch_weight(batch)
