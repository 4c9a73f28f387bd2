"""The plain-data sections of a report: results as JSON-ready dicts, and the run's metadata."""

from __future__ import annotations

import math
import platform
from datetime import datetime, timezone
from importlib.metadata import version

import numpy as np
import torch


def eig_dict(result) -> dict:
    """An ``EigResult`` as the ``EIGS`` object of the schema."""
    return {
        "which": result.which,
        "values": result.values.tolist(),
        "residuals": result.residuals.tolist(),
        "converged": bool(result.converged),
        "reason": result.reason,
        "n_matvecs": int(result.n_matvecs),
    }


def trace_dict(result) -> dict:
    """A ``TraceResult`` as the ``TRACE`` object of the schema."""
    return {
        "value": float(result.value),
        "stderr": float(result.stderr),
        "ci95": [float(x) for x in result.ci95],
        "method": result.method,
        "converged": bool(result.converged),
        "n_matvecs": int(result.n_matvecs),
    }


def density_dict(result, steps: int, probes: int) -> dict:
    """A ``DensityResult`` with its density smoothed on a 400-point grid."""
    lo, hi = result.support
    width = hi - lo if hi > lo else 1.0
    grid = torch.linspace(lo - 0.05 * width, hi + 0.05 * width, 400, dtype=torch.float64)
    sigma = 0.01 * width
    return {
        "steps": steps,
        "probes": probes,
        "nodes": result.nodes.tolist(),
        "weights": result.weights.tolist(),
        "grid": grid.tolist(),
        "values": result(grid, sigma).tolist(),
        "sigma": sigma,
        "support": [lo, hi],
        "n_matvecs": int(result.n_matvecs),
    }


def factor_trace(value: float) -> dict:
    """The ``TRACE`` object of a Kronecker operator's trace: exact, from its factors."""
    return {"value": float(value), "stderr": 0.0, "ci95": [float(value)] * 2,
            "method": "factors", "converged": True, "n_matvecs": 0}  # fmt: skip


def gap_dict(gap, approx, traces: dict[str, float], by: str) -> dict:
    """A ``CurvatureGap`` of the Kronecker operator ``approx`` as the ``KFAC`` object.

    Args:
        gap: the ``hesse.CurvatureGap`` of ``approx`` against the exact GGN.
        approx: the ``KFACOperator`` or ``EKFACOperator``.
        traces: ``tr(K)`` of each block of ``gap.blocks``, from the factors.
        by: what a block is (``"module"``, ``"block"``, ``"param"`` or ``"groups"``).
    """
    blocks = [_block_gap(name, b, traces[name]) for name, b in gap.blocks.items()]
    return {
        "approximation": type(approx).__name__, "kind": approx.kind, "approx": approx.approx,
        "exact": "ggn", "k": gap.k,
        "exact_eigenvalues": gap.exact_eigenvalues.tolist(),
        "approx_eigenvalues": gap.approx_eigenvalues.tolist(),
        "eigenvalue_errors": [_finite(x) for x in gap.eigenvalue_errors.tolist()],
        "principal_angles": gap.principal_angles.tolist(),
        "whole": _block_gap("whole", gap.whole, approx.trace()), "by": by, "blocks": blocks,
        "converged": bool(gap.converged), "reason": gap.reason, "n_matvecs": int(gap.n_matvecs),
    }  # fmt: skip


def _block_gap(name: str, b, approx_trace: float) -> dict:
    """A ``BlockGap`` as the ``BLOCK_GAP`` object, with ``tr(K)`` of the block."""
    return {
        "name": name, "dim": int(b.dim), "trace": trace_dict(b.trace),
        "approx_trace": float(approx_trace), "frobenius": _frobenius(b.frobenius),
        "exact_frobenius": _frobenius(b.exact_frobenius),
        "relative_frobenius": _finite(b.relative_frobenius),
    }  # fmt: skip


def _frobenius(result) -> dict:
    """A ``FrobeniusResult`` as the ``FROBENIUS`` object."""
    return {
        "value": float(result.value),
        "stderr": float(result.stderr),
        "ci95": [float(x) for x in result.ci95],
        "n_matvecs": int(result.n_matvecs),
    }


def _finite(x: float) -> float | None:
    """``x``, or None for inf (JSON has no infinity: a ratio to an exact 0)."""
    return float(x) if math.isfinite(x) else None


def no_ggn(reason: str) -> dict:
    """The ``ggn`` section when the GGN is not computed, and why."""
    return {"available": False, "reason": reason, "eigs": None, "trace": None}


def meta() -> dict:
    """Versions, platform and creation time (the command line is filled in by the CLI)."""
    return {
        "hesse": version("hesse"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": None,
    }
