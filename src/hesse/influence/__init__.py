"""Influence functions, unlearning and hypergradients: applications of inverse-curvature products.

- :func:`influence`: how removing each training point changes each query's loss.
- :func:`unlearn`: a model with a forget set removed (a Newton step, or IAU's gradient step).
- :func:`hypergradient`: the gradient of a validation loss with respect to regularization
  hyperparameters, by the implicit function theorem.
"""

from ._ihvp import METHODS as IHVP_METHODS
from ._ihvp import InverseDiagnostics
from .hyper import HypergradientResult, hypergradient
from .scores import InfluenceResult, TopInfluences, influence
from .unlearning import UnlearnResult, unlearn

__all__ = [
    "influence",
    "unlearn",
    "hypergradient",
    "InfluenceResult",
    "TopInfluences",
    "UnlearnResult",
    "HypergradientResult",
    "InverseDiagnostics",
    "IHVP_METHODS",
]
