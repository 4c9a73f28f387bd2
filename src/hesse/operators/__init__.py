"""Curvature matrices as linear operators."""

from .base import (
    PSD,
    SYMMETRIC,
    DenseOperator,
    IdentityOperator,
    Operator,
    ProductOperator,
    ScaledOperator,
    SumOperator,
)
from .model import FisherOperator, GGNOperator, HessianOperator, ModelOperator
from .woodbury import WoodburyFisher

__all__ = [
    "PSD",
    "SYMMETRIC",
    "DenseOperator",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "IdentityOperator",
    "ModelOperator",
    "Operator",
    "ProductOperator",
    "ScaledOperator",
    "SumOperator",
    "WoodburyFisher",
]
