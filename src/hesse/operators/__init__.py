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
from .model import (
    CURVATURES,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    ModelOperator,
    curvature_operator,
)
from .woodbury import WoodburyFisher

__all__ = [
    "CURVATURES",
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
    "curvature_operator",
]
