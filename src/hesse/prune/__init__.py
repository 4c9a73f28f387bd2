"""Second-order pruning: OBD, OBS, WoodFisher/M-FAC, layer-wise OBS, structured saliency.

Example:
    >>> import torch
    >>> from hesse import Objective, prune
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    >>> x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    >>> obj = Objective(model, [(x, y)], loss=torch.nn.functional.cross_entropy)
    >>> plan = prune.prune(obj, sparsity=0.75, method="mfac", recompute=2, m=32)
    >>> pruned = plan.apply(model)  # a copy; model is untouched
    >>> plan.removed_params, plan.total_params, plan.relative_damping
    (132, 176, (0.01, 0.01))
    >>> int((pruned[0].weight == 0).sum() + (pruned[2].weight == 0).sum())
    132
"""

from ._gradients import collect_gradients
from ._hesso_groups import hesso_groups, remove_groups
from ._result import Calibration
from ._units import Unit
from .hesso import CRIC, HESSO, HessoResult
from .layerwise import ObsLayerResult, layer_hessian, obs_layer
from .plan import GROUP_METHODS, WEIGHT_METHODS, PrunePlan, prune
from .saliency import Saliency, saliency
from .save import SavedCheckpoint, load, save
from .structured import GroupSaliency, expert_saliency, group_saliency

__all__ = [
    # the pipeline
    "prune",
    "PrunePlan",
    "WEIGHT_METHODS",
    "GROUP_METHODS",
    "Calibration",
    # checkpoints that load
    "save",
    "load",
    "SavedCheckpoint",
    # per-weight saliencies and their curvature
    "saliency",
    "Saliency",
    "collect_gradients",
    # layer-wise OBS (OBC / SparseGPT)
    "layer_hessian",
    "obs_layer",
    "ObsLayerResult",
    # heads and MLP neurons
    "group_saliency",
    "expert_saliency",
    "GroupSaliency",
    "Unit",
    # train and prune in one run
    "HESSO",
    "CRIC",
    "HessoResult",
    "hesso_groups",
    "remove_groups",
]
