"""The versioned schema of ``results.json`` and a small checker for it.

The schema is written as plain Python data: a type (or tuple of types) for a leaf, a dict
for an object (a key ending in ``"?"`` may be absent), a one-element list ``[spec]`` for a
list of items, and :class:`Nullable` for a value that may be ``null``. Bump
``SCHEMA_VERSION`` whenever a key changes meaning or disappears; new optional keys keep it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

SCHEMA_NAME = "hesse.report"
SCHEMA_VERSION = 1

Number = (int, float)


@dataclass(frozen=True)
class Nullable:
    """A value that is ``null`` or matches ``spec``."""

    spec: Spec


Spec = type | tuple[type, ...] | Nullable | dict[str, "Spec"] | list["Spec"]
"""A leaf type (or tuple of types), an object, a one-element list or a nullable value."""

EIGS: dict[str, Spec] = {
    "which": str,
    "values": [Number],
    "residuals": [Number],
    "converged": bool,
    "reason?": str,
    "n_matvecs": int,
}
TRACE: dict[str, Spec] = {
    "value": Number,
    "stderr": Number,
    "ci95": [Number],
    "method": str,
    "converged": bool,
    "n_matvecs": int,
}
DENSITY: dict[str, Spec] = {
    "steps": int,
    "probes": int,
    "nodes": [[Number]],
    "weights": [[Number]],
    "grid": [Number],
    "values": [Number],
    "sigma": Number,
    "support": [Number],
    "n_matvecs": int,
}
LAYER: dict[str, Spec] = {
    "name": str,
    "kind": str,
    "n_params": int,
    "trace": Number,
    "trace_stderr": Number,
    "trace_per_param": Number,
    "top_eigenvalue": Number,
    "top_residual": Number,
    "converged": bool,
}
FROBENIUS: dict[str, Spec] = {
    "value": Number,
    "stderr": Number,
    "ci95": [Number],
    "n_matvecs": int,
}
BLOCK_GAP: dict[str, Spec] = {
    "name": str,
    "dim": int,
    "trace": TRACE,
    "approx_trace": Number,
    "frobenius": FROBENIUS,
    "exact_frobenius": FROBENIUS,
    "relative_frobenius": Nullable(Number),
}
"""``G - K`` on one block (or the whole matrix): its trace and Frobenius norm, ``||G||_F``,
``tr(K)`` from the factors; ``relative_frobenius`` is null when ``||G||_F`` is 0."""
KFAC: dict[str, Spec] = {
    "approximation": str,
    "kind": str,
    "approx": str,
    "exact": str,
    "k": int,
    "exact_eigenvalues": [Number],
    "approx_eigenvalues": [Number],
    "eigenvalue_errors": [Nullable(Number)],
    "principal_angles": [Number],
    "whole": BLOCK_GAP,
    "by": str,
    "blocks": [BLOCK_GAP],
    "converged": bool,
    "reason": str,
    "n_matvecs": int,
}
"""A Kronecker curvature ``K`` against the exact GGN ``G`` (``hesse.curvature_gap``)."""
OUTLIERS: dict[str, Spec] = {
    "n_classes": Nullable(int),
    "expected": Nullable(int),
    "expected_rule": str,
    "n_outliers": Nullable(int),
    "gap_ratio": Nullable(Number),
    "gaps": [Number],
    "matches": Nullable(bool),
    "text": str,
}
VERDICT: dict[str, Spec] = {
    "criterion": str,
    "quantity": str,
    "value": Number,
    "low": Number,
    "high": Number,
    "threshold": Number,
    "ratio": Number,
    "status": str,
    "text": str,
    "reference": str,
}
SCHEMA: dict[str, Spec] = {
    "schema": str,
    "schema_version": int,
    "meta": {"hesse": str, "torch": str, "numpy": str, "python": str, "platform": str,
             "created": str, "command": Nullable(str)},
    "config": {"curvature": str, "sections": [str], "k": int, "k_smallest": int,
               "budget": int, "steps": int, "probes": int, "lr": Nullable(Number),
               "seed": int, "dtype": str, "device": str, "params?": Nullable([str]),
               "optimizer?": str, "momentum?": Number},
    "problem": {"model": str, "n_params": int, "n_samples": Nullable(int), "loss": Number,
                "loss_name": str, "gradient_norm": Number, "n_classes": Nullable(int),
                "description": Nullable(str), "training": Nullable(dict),
                "n_params_total?": int, "loss_source?": str},
    "eigs?": {"largest": EIGS, "smallest": EIGS},
    "trace?": TRACE,
    "density?": DENSITY,
    "ggn?": {"available": bool, "reason": Nullable(str), "eigs": Nullable(EIGS),
             "trace": Nullable(TRACE)},
    "kfac?": KFAC,
    "layers?": {"by": str, "rows": [LAYER]},
    "outliers?": OUTLIERS,
    "stability?": {"lr": Number, "threshold": Number, "verdicts": [VERDICT]},
    "criteria?": {"k": int, "eigenvalues": [Number], "lambda_max": Number, "ratio": Number,
                  "negative_share": Number, "trace": Number, "trace_stderr": Number,
                  "trace_ratio": Number, "definitions": dict},
    "plan?": dict,
    "partial?": [str],
    "notes": [str],
    "timings": dict,
}  # fmt: skip


def validate(doc: object) -> list[str]:
    """Check a results document against ``SCHEMA``.

    Args:
        doc: the parsed ``results.json``.

    Returns:
        One line per problem (``"problem.loss: expected a number, got str"``); empty when
        the document is valid.
    """
    errors: list[str] = []
    _check(doc, SCHEMA, "$", errors)
    if errors:
        return errors
    version = cast(dict, doc)["schema_version"]  # doc matched SCHEMA, an object
    if version != SCHEMA_VERSION:
        errors.append(f"$.schema_version: expected {SCHEMA_VERSION}, got {version}")
    return errors


def _check(value: object, spec: Spec, where: str, errors: list[str]) -> None:
    if isinstance(spec, Nullable):
        if value is not None:
            _check(value, spec.spec, where, errors)
    elif isinstance(spec, dict):
        _check_object(value, spec, where, errors)
    elif isinstance(spec, list):
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            _check(item, spec[0], f"{where}[{i}]", errors)
    elif isinstance(value, bool) and bool not in _types(spec):
        errors.append(f"{where}: expected {_name(spec)}, got bool")
    elif not isinstance(value, spec):
        errors.append(f"{where}: expected {_name(spec)}, got {type(value).__name__}")


def _check_object(value: object, spec: dict[str, Spec], where: str, errors: list[str]) -> None:
    if not isinstance(value, dict):
        errors.append(f"{where}: expected an object, got {type(value).__name__}")
        return
    keys = {key.rstrip("?"): key.endswith("?") for key in spec}
    for key in value.keys() - keys.keys():
        errors.append(f"{where}.{key}: unexpected key")
    for key, optional in keys.items():
        if key in value:
            _check(value[key], spec[key + "?" if optional else key], f"{where}.{key}", errors)
        elif not optional:
            errors.append(f"{where}.{key}: missing")


def _types(spec: type | tuple[type, ...]) -> tuple[type, ...]:
    return spec if isinstance(spec, tuple) else (spec,)


def _name(spec: type | tuple[type, ...]) -> str:
    return "a number" if spec == Number else " or ".join(t.__name__ for t in _types(spec))
