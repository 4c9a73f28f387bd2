"""Losses by name, as ``--loss`` spells them: ``gce:q=0.7``, ``zloss:a=2,b=1``, ``mae``."""

from __future__ import annotations

from collections.abc import Callable

from ._base import OutputLoss
from .adversarial import SmoothAdvCompSum
from .anyloss import AnyLoss
from .comp_sum import CompSum, gce
from .ensloss import EnsLoss
from .zloss import ZLoss

_FACTORIES: dict[str, tuple[Callable[..., OutputLoss], dict[str, type]]] = {
    "sum_exp": (lambda: CompSum(0.0), {}),
    "cross_entropy": (lambda: CompSum(1.0), {}),
    "mae": (lambda: CompSum(2.0), {}),
    "gce": (gce, {"q": float}),
    "comp_sum": (CompSum, {"tau": float}),
    "adv_comp_sum": (SmoothAdvCompSum, {"tau": float, "nu": float}),
    "zloss": (ZLoss, {"a": float, "b": float}),
    "anyloss": (AnyLoss, {"metric": str, "beta": float, "L": float}),
    "ensloss": (EnsLoss, {"seed": int, "lam": float}),
}
NAMES = tuple(_FACTORIES)
"""The names :func:`parse` knows (torch's ``cross_entropy`` and ``mse`` are named elsewhere)."""


def parse(text: str) -> OutputLoss:
    """The loss that ``text`` names: ``name`` or ``name:key=value,key=value``.

    Names and keys: ``sum_exp``, ``mae``, ``gce:q=``, ``comp_sum:tau=``,
    ``adv_comp_sum:tau=,nu=``, ``zloss:a=,b=``, ``anyloss:metric=,beta=,L=`` (metric one of
    accuracy, f_beta, g_mean, balanced_accuracy), ``ensloss:seed=,lam=``. Omitted keys take
    the defaults of the loss. ``parse(loss.spec)`` rebuilds ``loss``.

    Raises:
        ValueError: an unknown name or key, or a value of the wrong type.

    Example:
        >>> parse("gce:q=0.5").tau, parse("anyloss:metric=g_mean").spec
        (1.5, 'anyloss:metric=g_mean,L=73')
    """
    name, _, rest = text.partition(":")
    if name not in _FACTORIES:
        raise ValueError(
            f"loss {text!r}: unknown name {name!r}; hesse.losses knows {', '.join(NAMES)} "
            "(plus torch's cross_entropy and mse)."
        )
    factory, keys = _FACTORIES[name]
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if key not in keys or not eq:
            allowed = ", ".join(f"{k}=" for k in keys) or "no parameters"
            raise ValueError(f"loss {text!r}: {item!r} is not a setting of {name} ({allowed}).")
        try:
            kwargs[key] = keys[key](value)
        except ValueError:
            raise ValueError(
                f"loss {text!r}: {key}={value!r} is not a {keys[key].__name__}."
            ) from None
    return factory(**kwargs)
