"""Curvature matrices as linear operators."""

from .base import (
    PSD,
    SYMMETRIC,
    IdentityOperator,
    Operator,
    ProductOperator,
    ScaledOperator,
    SumOperator,
)
from .curvatures import CURVATURES, KRONECKER_KINDS, curvature_operator, kronecker_operator
from .dense import DenseOperator, infer_tags
from .gauss_newton import FisherOperator, GGNOperator
from .hessian import HessianOperator
from .kfac import EKFACOperator, KFACOperator
from .model import ModelOperator
from .woodbury import WoodburyFisher

__all__ = [
    "CURVATURES",
    "PSD",
    "SYMMETRIC",
    "DenseOperator",
    "EKFACOperator",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "IdentityOperator",
    "KFACOperator",
    "ModelOperator",
    "Operator",
    "ProductOperator",
    "ScaledOperator",
    "SumOperator",
    "WoodburyFisher",
    "curvature_operator",
    "KRONECKER_KINDS",
    "kronecker_operator",
    "infer_tags",
]
