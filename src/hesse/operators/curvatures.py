"""The curvature matrices the applications take by name."""

from __future__ import annotations

from .gauss_newton import FisherOperator, GGNOperator
from .hessian import HessianOperator
from .model import ModelOperator

CURVATURES = ("hessian", "ggn", "fisher")
"""The curvature matrices the applications take by name (``curvature=``)."""


def curvature_operator(obj, curvature: str, who: str = "curvature_operator") -> ModelOperator:
    """The operator of ``obj`` named ``curvature``: ``"hessian"``, ``"ggn"`` or ``"fisher"``.

    ``"fisher"`` is the empirical Fisher (:class:`FisherOperator`'s default).

    Raises:
        ValueError: an unknown name (the message starts with ``who``).
    """
    kinds = {"hessian": HessianOperator, "ggn": GGNOperator, "fisher": FisherOperator}
    if curvature not in kinds:
        raise ValueError(f"{who}: curvature must be one of {CURVATURES}, got {curvature!r}.")
    return kinds[curvature](obj)
