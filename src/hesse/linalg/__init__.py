"""Numerical algorithms on any symmetric operator (or dense tensor)."""

from .density import DensityResult, density
from .eigs import EigResult, eigs
from .frobenius import FrobeniusResult, frobenius_norm
from .gap import BlockGap, CurvatureGap, curvature_gap
from .inverse import InverseOperator, inverse
from .power import power_iteration
from .solve import NotConvergedError, SolveResult, solve
from .trace import DiagonalResult, TraceResult, block_traces, diagonal, trace

__all__ = [
    "BlockGap",
    "CurvatureGap",
    "DensityResult",
    "DiagonalResult",
    "EigResult",
    "FrobeniusResult",
    "InverseOperator",
    "NotConvergedError",
    "SolveResult",
    "TraceResult",
    "block_traces",
    "curvature_gap",
    "density",
    "diagonal",
    "eigs",
    "frobenius_norm",
    "inverse",
    "power_iteration",
    "solve",
    "trace",
]
