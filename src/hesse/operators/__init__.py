"""Curvature matrices as linear operators."""

from .base import (
    PSD,
    SYMMETRIC,
    DenseOperator,
    IdentityOperator,
    Operator,
    ScaledOperator,
    SumOperator,
)
from .model import FisherOperator, GGNOperator, HessianOperator, ModelOperator

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
    "ScaledOperator",
    "SumOperator",
]
