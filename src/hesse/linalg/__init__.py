"""Numerical algorithms on any symmetric operator (or dense tensor)."""

from .density import DensityResult, density
from .eigs import EigResult, eigs, power_iteration
from .frobenius import FrobeniusResult, frobenius_norm
from .solve import InverseOperator, NotConvergedError, SolveResult, solve
from .trace import DiagonalResult, TraceResult, block_traces, diagonal, trace

__all__ = [
    "DensityResult",
    "DiagonalResult",
    "EigResult",
    "FrobeniusResult",
    "InverseOperator",
    "NotConvergedError",
    "SolveResult",
    "TraceResult",
    "block_traces",
    "density",
    "diagonal",
    "eigs",
    "frobenius_norm",
    "power_iteration",
    "solve",
    "trace",
]
