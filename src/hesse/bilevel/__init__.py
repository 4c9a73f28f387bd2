"""Bilevel optimisation on Hessian-vector products (hypergradients without inverting).

- :func:`solve`: minimize an upper-level objective over hyperparameters whose lower-level
  parameters minimize another, by BSVRB (tracked inverse-Hessian-vector products, blocks and
  mini-batches sampled), LV-HBA (Hessian-free, constrained lower level) or implicit-function
  hypergradients with CG.
"""

from .bsvr import BSVROptions
from .implicit import ImplicitOptions
from .lvhba import LVHBAOptions
from .solve import OPTIONS, BilevelResult, Trajectory, solve

__all__ = [
    "solve",
    "BilevelResult",
    "Trajectory",
    "BSVROptions",
    "LVHBAOptions",
    "ImplicitOptions",
    "OPTIONS",
]
