"""Differentiable curvature penalties to add to a training loss."""

from .alignment import hessian_alignment
from .penalties import gradient_norm, hessian_trace

__all__ = [
    # sharpness of one loss
    "hessian_trace",
    "gradient_norm",
    # agreement across domains
    "hessian_alignment",
]
