"""The ``Report`` of an analysis: every number with its diagnostics, and how to write it out."""

from __future__ import annotations

import dataclasses
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hesse import report as _render
from hesse.analysis.layers import LayerRow
from hesse.analysis.outliers import Outliers
from hesse.dynamics.verdicts import Verdict
from hesse.report.text import WIDTH

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

HEADER_LINES = 2
"""Lines of the summary's header (model, curvature); the parameter and plan lines follow."""


@dataclass(frozen=True)
class Report:
    """The curvature of one model's loss: spectrum, trace, density, layers, verdicts.

    Sections that were not computed are None. Numbers are plain floats and lists, so that
    ``to_dict()`` is the ``results.json`` document (schema ``hesse.report``, see
    ``hesse.report.schema``).

    Attributes:
        meta: versions (hesse, torch, numpy, python), platform, creation time, command line.
        config: the analysis options, seed included.
        problem: model, parameter and sample counts, loss value and name, gradient norm.
        eigs: ``{"largest": ..., "smallest": ...}``: values, residual bounds, diagnostics.
        trace: the trace estimate with standard error and 95% CI.
        density: SLQ nodes and weights, and the smoothed density on a grid.
        ggn: the GGN's top eigenvalues and trace beside the Hessian's (or why not).
        kfac: for a Kronecker curvature (``kfac``, ``ekfac``), its gap to the exact GGN
            (``hesse.curvature_gap``): the top-k eigenvalues of both with their relative
            errors, the principal angles between the top-k eigenspaces, and, whole and per
            block, the trace and Frobenius norm of ``G - K`` with standard errors, ``||G||_F``
            and ``tr(K)`` (from the factors).
        layers: the per-module table.
        outliers: the bulk/outlier split of the top eigenvalues.
        stability: the GD and SGD verdicts at the training learning rate.
        criteria: LLA's spectral criteria (``hesse.dynamics.SpectralCriteria`` as a dict:
            λmax/λk, the negative share of the spectrum, Tr/λmax, with their definitions),
            when the eigenvalues and the density were computed.
        notes: remarks on the run (skipped sections, caveats).
        timings: seconds per section.
        plan: the memory plan the run followed (``hesse.plan``), with a one-line ``summary``.
        partial: sections asked for but not computed, because the time budget ran out.
        layers_by: what a row of ``layers`` is: ``"module"``, or ``"block"`` (the attention
            or the MLP of a transformer layer).
    """

    meta: dict
    config: dict
    problem: dict
    eigs: dict | None = None
    trace: dict | None = None
    density: dict | None = None
    ggn: dict | None = None
    kfac: dict | None = None
    layers: tuple[LayerRow, ...] | None = None
    outliers: Outliers | None = None
    stability: tuple[Verdict, ...] | None = None
    criteria: dict | None = None
    notes: tuple[str, ...] = ()
    timings: dict = field(default_factory=dict)
    plan: dict | None = None
    partial: tuple[str, ...] = ()
    layers_by: str = "module"

    def to_dict(self) -> dict:
        """The ``results.json`` document (absent sections are left out)."""
        doc = {
            "schema": _render.SCHEMA_NAME,
            "schema_version": _render.SCHEMA_VERSION,
            "meta": self.meta,
            "config": self.config,
            "problem": self.problem,
        }
        sections: dict[str, Any] = {
            "eigs": self.eigs,
            "trace": self.trace,
            "density": self.density,
            "ggn": self.ggn,
            "kfac": self.kfac,
            "criteria": self.criteria,
        }
        if self.layers is not None:
            sections["layers"] = {"by": self.layers_by, "rows": [_plain(r) for r in self.layers]}
        if self.outliers is not None:
            sections["outliers"] = _plain(self.outliers)
        if self.stability:
            lr = self.config["lr"]
            verdicts = [_plain(v) for v in self.stability]
            threshold = self.stability[0].threshold
            sections["stability"] = {"lr": lr, "threshold": threshold, "verdicts": verdicts}
        if self.plan is not None:
            sections["plan"] = self.plan
        if self.partial:
            sections["partial"] = list(self.partial)
        doc |= {key: value for key, value in sections.items() if value is not None}
        return doc | {"notes": list(self.notes), "timings": self.timings}

    def summary(self) -> str:
        """The compact text table that ``hesse analyze`` prints."""
        doc = self.to_dict()
        lines = _render.render_text(doc).split("\n")
        p = doc["problem"]
        extra = [
            parameters_line(p["n_params"], p.get("n_params_total", p["n_params"]),
                            doc["config"].get("params"))
        ]  # fmt: skip
        if "plan" in doc:
            extra.append(textwrap.fill(doc["plan"]["summary"], WIDTH, subsequent_indent="  "))
        return "\n".join(lines[:HEADER_LINES] + extra + lines[HEADER_LINES:])

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write ``results.json`` (validated against the schema) atomically."""
        return _render.write_json(self.to_dict(), path)

    def to_html(self, path: str | os.PathLike) -> Path:
        """Write the self-contained HTML report (plots inlined) atomically."""
        return _render.write_html(self.to_dict(), path)

    def save(self, folder: str | os.PathLike) -> dict[str, Path]:
        """Write ``results.json``, the PNG plots and ``report.html`` into ``folder``."""
        return _render.write_all(self.to_dict(), folder)


def parameters_line(dim: int, total: int, selection: list[str] | None) -> str:
    """``"parameters analysed: N of M (selection: ...)"``.

    Example:
        >>> parameters_line(30, 51, ["0.*"])
        'parameters analysed: 30 of 51 (selection: 0.*)'
    """
    chosen = "all trainable" if selection is None else "selection: " + ", ".join(selection)
    return f"parameters analysed: {dim} of {total} ({chosen})"


def _plain(obj: DataclassInstance) -> dict:
    """A frozen dataclass as a JSON-ready dict (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}
