"""Numerical algorithms on any symmetric operator (or dense tensor)."""

from .density import DensityResult, density
from .eigs import EigResult, eigs, power_iteration
from .solve import SolveResult, solve
from .trace import DiagonalResult, TraceResult, block_traces, diagonal, trace

__all__ = [
    "DensityResult",
    "DiagonalResult",
    "EigResult",
    "SolveResult",
    "TraceResult",
    "block_traces",
    "density",
    "diagonal",
    "eigs",
    "power_iteration",
    "solve",
    "trace",
]
