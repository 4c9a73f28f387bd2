"""hesse: the curvature of neural-network losses, measured and put to use."""

import sys

from . import bilevel, dynamics, losses, optim, ot, prune, quant, regularize
from .analysis import Analysis, Report, analyze, prepare
from .dynamics import (
    BatchSpectrum,
    Landscape,
    SharpnessMonitor,
    SharpnessRecord,
    SpectralCriteria,
    Stability,
    batch_spectrum,
    landscape,
    spectral_criteria,
    stability,
)
from .influence import (
    HypergradientResult,
    InfluenceResult,
    InverseDiagnostics,
    TopInfluences,
    UnlearnResult,
    hypergradient,
    influence,
    unlearn,
)
from .linalg import (
    BlockGap,
    CurvatureGap,
    DensityResult,
    DiagonalResult,
    EigResult,
    FrobeniusResult,
    InverseOperator,
    NotConvergedError,
    SolveResult,
    TraceResult,
    block_traces,
    curvature_gap,
    density,
    diagonal,
    eigs,
    frobenius_norm,
    inverse,
    power_iteration,
    solve,
    trace,
)
from .operators import (
    DenseOperator,
    EKFACOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    IdentityOperator,
    KFACOperator,
    Operator,
    ProductOperator,
    WoodburyFisher,
    reference,
)
from .operators.plan import MemoryPlan, MemoryPlanError, plan
from .problem import hf
from .problem.objective import LossSpec, Objective
from .problem.params import ParamSpace

# the documented module paths `hesse.hf` and `hesse.reference` name their modules' new homes
sys.modules[f"{__name__}.hf"] = hf
sys.modules[f"{__name__}.reference"] = reference

__version__ = "0.1.0"

__all__ = [
    # the function of the parameters
    "Objective",
    "LossSpec",
    "ParamSpace",
    # losses with closed-form output curvature (comp-sum, Z-loss, AnyLoss, EnsLoss)
    "losses",
    # curvature operators
    "Operator",
    "HessianOperator",
    "GGNOperator",
    "FisherOperator",
    "DenseOperator",
    "IdentityOperator",
    "ProductOperator",
    "WoodburyFisher",
    # Kronecker-factored curvature
    "KFACOperator",
    "EKFACOperator",
    "curvature_gap",
    "CurvatureGap",
    "BlockGap",
    # memory before a run
    "plan",
    "MemoryPlan",
    "MemoryPlanError",
    # algorithms and their results
    "eigs",
    "power_iteration",
    "trace",
    "block_traces",
    "diagonal",
    "density",
    "frobenius_norm",
    "solve",
    "inverse",
    "InverseOperator",
    "NotConvergedError",
    "EigResult",
    "TraceResult",
    "DiagonalResult",
    "DensityResult",
    "FrobeniusResult",
    "SolveResult",
    # dense references
    "reference",
    # the report of a model
    "analyze",
    "prepare",
    "Analysis",
    "Report",
    # Hugging Face folders and text files
    "hf",
    # training dynamics and loss landscapes
    "SharpnessMonitor",
    "SharpnessRecord",
    "stability",
    "Stability",
    "landscape",
    "Landscape",
    "batch_spectrum",
    "BatchSpectrum",
    "spectral_criteria",
    "SpectralCriteria",
    "dynamics",
    # applications
    "quant",
    "prune",
    # bilevel optimization on Hessian-vector products (hesse.bilevel.solve)
    "bilevel",
    # training: second-order and sharpness-aware optimizers, curvature penalties
    "optim",
    "regularize",
    # optimal transport: Sinkhorn and Sinkhorn-Newton-Sparse (hesse.ot)
    "ot",
    # influence, unlearning and hypergradients (inverse-curvature products)
    "influence",
    "unlearn",
    "hypergradient",
    "InfluenceResult",
    "TopInfluences",
    "UnlearnResult",
    "HypergradientResult",
    "InverseDiagnostics",
]
