"""The plain-data sections of a report: results as JSON-ready dicts, and the run's metadata."""

from __future__ import annotations

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
