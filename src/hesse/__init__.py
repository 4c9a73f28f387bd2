"""hesse: the curvature of neural-network losses, measured and put to use."""

from . import reference
from .analysis import Report, analyze
from .linalg import (
    DensityResult,
    DiagonalResult,
    EigResult,
    SolveResult,
    TraceResult,
    block_traces,
    density,
    diagonal,
    eigs,
    power_iteration,
    solve,
    trace,
)
from .objective import Objective
from .operators import (
    DenseOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    IdentityOperator,
    Operator,
)
from .params import ParamSpace

__version__ = "0.1.0"

__all__ = [
    # the function of the parameters
    "Objective",
    "ParamSpace",
    # curvature operators
    "Operator",
    "HessianOperator",
    "GGNOperator",
    "FisherOperator",
    "DenseOperator",
    "IdentityOperator",
    # algorithms and their results
    "eigs",
    "power_iteration",
    "trace",
    "block_traces",
    "diagonal",
    "density",
    "solve",
    "EigResult",
    "TraceResult",
    "DiagonalResult",
    "DensityResult",
    "SolveResult",
    # dense references
    "reference",
    # the report of a model
    "analyze",
    "Report",
]
