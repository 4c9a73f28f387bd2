"""Loss functions whose curvature with respect to the outputs is known in closed form.

Each loss is a callable ``(outputs, targets) -> mean loss`` (an :class:`OutputLoss`) that
declares its output Hessian (:meth:`OutputLoss.hessian_product`), whether it is convex in the
outputs (then the GGN is PSD) and how many Hessian outliers it predicts. :class:`~hesse.Objective`
recognises them like torch's losses; :func:`parse` builds one from its ``--loss`` name.

- comp-sum losses (Mao, Mohri and Zhong 2023): :class:`CompSum`, :data:`sum_exp`,
  :data:`cross_entropy`, :func:`gce`, :data:`mae`; their smooth adversarial versions
  :class:`SmoothAdvCompSum` on paired outputs (:class:`Paired`, :func:`adversarial_pairs`);
- :class:`ZLoss` (de Brébisson and Vincent 2016);
- :class:`AnyLoss` (Han, Moniz and Chawla 2024) for binary classification;
- :class:`EnsLoss` (Wang and Shen 2024), a training-time loss drawn anew at every call;
- :class:`SquaredError` (torch's ``mse_loss``), and the declarations of torch's losses.
"""

from ._base import OutputLoss
from ._names import NAMES, parse
from .adversarial import Paired, SmoothAdvCompSum, adversarial_pairs
from .anyloss import METRICS, AnyLoss
from .comp_sum import CompSum, cross_entropy, gce, mae, sum_exp
from .ensloss import EnsLoss
from .squared import SquaredError, nll_curvature
from .zloss import ZLoss

__all__ = [
    "METRICS",
    "NAMES",
    "AnyLoss",
    "CompSum",
    "EnsLoss",
    "OutputLoss",
    "Paired",
    "SmoothAdvCompSum",
    "SquaredError",
    "ZLoss",
    "adversarial_pairs",
    "cross_entropy",
    "gce",
    "mae",
    "nll_curvature",
    "parse",
    "sum_exp",
]
