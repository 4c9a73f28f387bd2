"""Second-order and sharpness-aware optimizers that drop into a ``torch.optim`` loop."""

from .adahessian import AdaHessian
from .estimators import GaussNewtonBartlett, Hutchinson, rademacher, spatial_average
from .gns import GNSNewton, GNSResult, gns_accept, gns_newton, gns_step
from .mfac import MFAC
from .newton import NewtonCG
from .sam import SAM
from .sophia import Sophia, SophiaG, SophiaH
from .trajectory import TrajectoryLoss
from .updates import adahessian_update, sam_perturbation, sophia_update

__all__ = [
    # Hessian-diagonal preconditioning
    "AdaHessian",
    "Sophia",
    "SophiaH",
    "SophiaG",
    # sharpness-aware training
    "SAM",
    "TrajectoryLoss",
    # curvature-matrix steps
    "MFAC",
    "NewtonCG",
    "GNSNewton",
    # full-batch gradient-normalized smoothness Newton (exact, GGN, Fisher, KFAC curvature)
    "gns_newton",
    "GNSResult",
    # Hessian-diagonal estimators (pluggable)
    "Hutchinson",
    "GaussNewtonBartlett",
    "spatial_average",
    "rademacher",
    # the pure updates
    "adahessian_update",
    "sophia_update",
    "sam_perturbation",
    "gns_step",
    "gns_accept",
]
