"""The two tools' operators on a workload, built the same way for agreement, timing and memory.

curvlinops is asked for the matrix hesse computes: ``separate_weight_and_bias=False`` (hesse
puts the bias in the activation factor), ``CrossEntropyLoss(reduction="mean")`` with
``num_data`` and ``num_per_example_loss_terms`` given (so no extra pass over the data counts
them), ``check_deterministic=False`` (hesse does not check either), exact damping for the
inverse (hesse's ``inverse(damping)`` is the exact inverse of ``K + damping I``). Its
``fisher_type`` "type-2", "mc", "empirical" are hesse's ``kind`` "exact", "mc", "empirical".
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

import hesse

warnings.filterwarnings("ignore", module="curvlinops|backpack|torch")
from curvlinops import (  # noqa: E402
    EKFACLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
)

FISHER_TYPE = {"exact": "type-2", "mc": "mc", "empirical": "empirical"}
HESSE = {"KFAC": hesse.KFACOperator, "EKFAC": hesse.EKFACOperator}
CURVLINOPS = {"KFAC": KFACLinearOperator, "EKFAC": EKFACLinearOperator}
DAMPING = 1e-3


def objective(w) -> hesse.Objective:
    return hesse.Objective(w.model, w.batches, w.loss, params=w.params)


def build_hesse(w, op: str, kind: str, obj: hesse.Objective | None = None):
    """The hesse operator (one pass over the data; EKFAC two), on ``obj`` or a new Objective."""
    return HESSE[op](obj or objective(w), kind=kind)


def build_curvlinops(w, op: str, kind: str, names: list[str]):
    """The curvlinops operator with its factors computed (they are lazy otherwise)."""
    named = dict(w.model.named_parameters())
    C = CURVLINOPS[op](
        w.c_model,
        nn.CrossEntropyLoss(),
        [named[n] for n in names],
        w.c_batches,
        fisher_type=FISHER_TYPE[kind],
        separate_weight_and_bias=False,
        check_deterministic=False,
        num_data=w.n,
        num_per_example_loss_terms=w.terms,
    )
    C.compute_kronecker_factors()
    if op == "EKFAC":
        C.compute_eigenvalue_correction()
    return C


def build(tool: str, w, op: str, kind: str, names: list[str], obj=None):
    if tool == "hesse":
        return build_hesse(w, op, kind, obj)
    return build_curvlinops(w, op, kind, names)


def inverse(tool: str, K):
    if tool == "hesse":
        return K.inverse(damping=DAMPING)
    return KFACInverseLinearOperator(K, damping=DAMPING, use_exact_damping=True)


def gradient(w, params: list[torch.Tensor]) -> None:
    """One full-data gradient of the same objective in plain PyTorch (the time unit)."""
    for X, y in w.c_batches:
        out = w.c_model(X)
        loss = nn.functional.cross_entropy(out, y) * (len(X) / w.n)
        torch.autograd.grad(loss, params)
