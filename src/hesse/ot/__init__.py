"""Optimal transport: entropic OT by Sinkhorn and sparse Newton steps; imports nothing of hesse."""

from ._problem import OTResult
from .sinkhorn import sinkhorn
from .sinkhorn_newton import sinkhorn_newton

__all__ = ["sinkhorn", "sinkhorn_newton", "OTResult"]
