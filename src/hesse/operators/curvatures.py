"""The curvature matrices the applications take by name."""

from __future__ import annotations

from .gauss_newton import FisherOperator, GGNOperator
from .hessian import HessianOperator
from .kfac import EKFACOperator, KFACOperator
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


KRONECKER_KINDS = {"ggn": "exact", "fisher": "empirical"}
"""The factors' ``kind`` of each curvature a Kronecker operator approximates."""


def kronecker_operator(obj, method: str, curvature: str = "ggn") -> KFACOperator | EKFACOperator:
    """The ``KFACOperator`` (``method="kfac"``) or ``EKFACOperator`` (``"ekfac"``) of ``obj``.

    ``curvature="ggn"``: factors of kind ``"exact"`` (KFLR); ``"fisher"``: ``"empirical"``.
    """
    builds: dict[str, type[KFACOperator] | type[EKFACOperator]]
    builds = {"kfac": KFACOperator, "ekfac": EKFACOperator}
    return builds[method](obj, kind=KRONECKER_KINDS[curvature])
